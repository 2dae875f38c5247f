"""Benchmark cases shared by `itconv-fast bench` and the pytest-benchmark suite in benchmarks/.

Each case is a gradient set shaped like the paper's networks plus the competing implementations of
the same work, so both front ends time exactly the same code.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from typing import Callable

import torch

from . import ops

SLOTS_CONV = 2  # conv1.weight, conv2.weight
SLOTS_BN = 4  # bn1.{weight,bias}, bn2.{weight,bias}


def resnet_gradient_groups(width=16, blocks=16, stages=3, dtype=torch.float32, device="cpu", seed=0):
    """The gradients of every block parameter of the paper's ResNet (SPEC 1): stages x 6 slots groups of T."""
    gen = torch.Generator(device=device).manual_seed(seed)
    groups = []
    for s in range(stages):
        c = width * 2**s
        for shape in [(c, c, 3, 3)] * SLOTS_CONV + [(c,)] * SLOTS_BN:
            groups.append([torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(blocks)])
    return groups


def loop_coupling(groups, lam):
    """(a) What users write today: one stack/mean/mul_/add_ round per parameter slot."""
    for group in groups:
        mean = torch.stack(group).mean(0)
        for g in group:
            g.mul_(1 - lam).add_(mean, alpha=lam)


def foreach_coupling(groups, lam):
    """(b) The best pure PyTorch we know: _foreach ops over all slots of the same T at once."""
    by_t: dict[int, list] = {}
    for group in groups:
        by_t.setdefault(len(group), []).append(group)
    for T, gs in by_t.items():
        sums = torch._foreach_add([g[0] for g in gs], [g[1] for g in gs]) if T > 1 else [g[0].clone() for g in gs]
        for u in range(2, T):
            torch._foreach_add_(sums, [g[u] for g in gs])
        torch._foreach_mul_(sums, lam / T)
        for t in range(T):
            members = [g[t] for g in gs]
            torch._foreach_mul_(members, 1 - lam)
            torch._foreach_add_(members, sums)


def compiled_reference(groups, lam):
    """(c) torch.compile of the per-slot reference (compiled once per gradient set and lam)."""
    fn = torch.compile(_reference_functional, dynamic=False)
    return lambda: fn(groups, lam)


def _reference_functional(groups, lam):
    for group in groups:
        stacked = torch.stack(group)
        mixed = (1 - lam) * stacked + lam * stacked.mean(0, keepdim=True)
        for g, m in zip(group, mixed.unbind(0)):
            g.copy_(m)


def fused_coupling(groups, lam):
    """The toolkit's op: one call for every group."""
    ops.soft_couple_(groups, lam)


def copy_floor(groups):
    """(d) The memory floor: copying the same bytes once (read + write each gradient)."""
    total = sum(g.numel() for group in groups for g in group)
    src = torch.empty(total, dtype=groups[0][0].dtype, device=groups[0][0].device).normal_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def coupling_cases(groups, lam=0.5, compile_reference=True) -> dict[str, Callable[[], object]]:
    cases = {
        "fused soft_couple_": lambda: fused_coupling(groups, lam),
        "(a) per-slot loop": lambda: loop_coupling(groups, lam),
        "(b) _foreach": lambda: foreach_coupling(groups, lam),
    }
    if compile_reference:
        cases["(c) torch.compile(reference)"] = compiled_reference(groups, lam)
    cases["(d) copy (memory floor)"] = copy_floor(groups)
    return cases


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: str) -> dict:
    from . import _extension

    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "extension": ops.extension_loaded(),
        "backend": "compiled extension" if ops.extension_loaded() else "pure-PyTorch reference (extension not loaded)",
        "cuda_kernels_compiled": bool(ops.extension_loaded() and _extension.cuda_compiled()),
        "cuda_arch_list": _extension.build_info().get("cuda_arch_list"),
        "cpu_isa": _extension.cpu_info().get("isa", "n/a (reference)"),
        "l1d": ({k: v for k, v in _extension.cpu_info().items() if k.startswith("l1d")} or None),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
    }
    if device.startswith("cuda"):
        info["device"] = torch.cuda.get_device_name(device)
    else:
        info["device"] = "cpu"
    return info


def label_backend(table: str) -> str:
    """A table as printed: headed by a warning when the ops ran their pure-PyTorch references (no extension),
    so that a fallback run is never read as the compiled kernels' times."""
    if ops.extension_loaded():
        return table
    return ("[BACKEND: pure-PyTorch reference (the compiled extension is not loaded); the 'fused' / 'batched' "
            "rows time the references, not the kernels]\n" + table)


def run_comparison(cases_by_width: dict, *, label: str, reference: str, device="cpu", min_run_time=1.0, name="",
                   warmup: int = 2, block_time: float = 0.02, min_rounds: int = 3) -> tuple[dict, str]:
    """Times every case side by side and returns (JSON-ready report, table).

    The cases of one width are measured interleaved: round after round, every case runs one block of
    calls (torch.utils.benchmark `Timer.timeit`, sized to about `block_time`), so that the drift of a
    shared machine (memory bandwidth, clocks) hits all cases alike; a case's time is the median over
    its blocks (`Measurement.merge`). Rounds go on until every case had about `min_run_time` seconds.

    cases_by_width: {width: {case name: zero-argument callable}}; `reference` names the toolkit's case,
    against which the report's ratios (other case's time / reference time) are given.
    """
    from torch.utils import benchmark

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    results, rows = [], []
    for width, cases in cases_by_width.items():
        timers = {}
        for case, fn in cases.items():
            for _ in range(warmup):  # warm-up (and compilation)
                fn()
            sync()
            timer = benchmark.Timer(
                stmt="fn()", globals={"fn": fn}, label=label, sub_label=case,
                description=f"width {width}" if isinstance(width, int) else str(width),
                num_threads=torch.get_num_threads(),
            )
            if block_time <= 0:  # one call per block: no sizing call (a call may take minutes)
                timers[case] = (timer, 1)
                continue
            per_call = timer.timeit(1).median
            timers[case] = (timer, max(1, int(block_time / max(per_call, 1e-9))))
        blocks = {case: [] for case in cases}
        start, rounds = time.perf_counter(), 0
        while rounds < min_rounds or time.perf_counter() - start < min_run_time * len(cases):
            for case, (timer, number) in timers.items():
                blocks[case].append(timer.timeit(number))
            rounds += 1
        for case in cases:
            m = benchmark.Measurement.merge(blocks[case])[0]
            results.append(m)
            rows.append({"width": width, "case": case, "median_s": m.median, "iqr_s": m.iqr, "rounds": rounds})
    compare = benchmark.Compare(results)
    compare.trim_significant_figures()
    report = {"benchmark": name or label, "machine": machine_description(device), "rows": rows, "ratios": {},
              "method": "cases interleaved round by round; medians over rounds"}
    for width in cases_by_width:
        by_case = {r["case"]: r["median_s"] for r in rows if r["width"] == width}
        key = f"width {width}" if isinstance(width, int) else str(width)
        report["ratios"][key] = {c: t / by_case[reference] for c, t in by_case.items() if c != reference}
    return report, label_backend(str(compare))


def run_coupling_benchmark(widths=(16, 64), device="cpu", min_run_time=1.0, compile_reference=True, lam=0.5):
    """One coupling step on the ResNet-101 gradient set, every implementation side by side."""
    cases = {}
    for width in widths:
        groups = resnet_gradient_groups(width=width, device=device)
        cases[width] = coupling_cases(groups, lam, compile_reference)
    return run_comparison(cases, label="soft gradient coupling, ResNet-101 gradients", reference="fused soft_couple_",
                          device=device, min_run_time=min_run_time, name="coupling")


# ---------------------------------------------------------------------------------------------
# Spectral norms
# ---------------------------------------------------------------------------------------------


def resnet_block_convs(width=16, blocks=16, stages=3, input_size=32, device="cpu", seed=0):
    """The 2 x T block convolutions of every stage of the paper's ResNet: [(weights list, (H, W))] per slot."""
    gen = torch.Generator(device=device).manual_seed(seed)
    slots = []
    for s in range(stages):
        c, h = width * 2**s, input_size // 2**s
        for _ in range(2):
            ws = [torch.randn(c, c, 3, 3, generator=gen, device=device) * (2.0 / (9 * c)) ** 0.5 for _ in range(blocks)]
            slots.append((ws, (h, h)))
    return slots


def spectral_cases(slots, device="cpu") -> dict[str, Callable[[], object]]:
    """One power step for every block conv: batched (one call per stage and slot) against per-layer loops."""
    from torch.nn.utils.parametrizations import spectral_norm

    # Batched: one call per stage and slot, on the list of the T blocks' kernels (read where they lie,
    # as the model passes them; a 5-D stack would cost a copy of every weight per call).
    u_op = [ops.init_power_vector(ws, "operator", size) for ws, size in slots]
    u_mat = [ops.init_power_vector(ws, "matrix") for ws, _ in slots]

    def batched(mode, us):
        def run():
            for (ws, size), u in zip(slots, us):
                ops.batched_spectral_norm(ws, u, mode=mode, n_iter=1, input_size=size)
        return run

    # Per layer, matrix: torch's own parametrization (one power step per weight access in training mode).
    convs = []
    for ws, _ in slots:
        for w in ws:
            conv = torch.nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1, bias=False).to(device)
            with torch.no_grad():
                conv.weight.copy_(w)
            convs.append(spectral_norm(conv).train())

    def per_layer_matrix():
        for conv in convs:
            conv.weight  # noqa: B018  (runs the power step and the division)

    # Per layer, operator: the conv / conv_transpose loop written by hand.
    per_layer_u = [[torch.nn.functional.normalize(torch.randn((1, w.shape[0]) + size, device=device).flatten(), dim=0).view((1, w.shape[0]) + size) for w in ws] for ws, size in slots]

    def per_layer_operator():
        with torch.no_grad():
            for (ws, _), us in zip(slots, per_layer_u):
                for w, u in zip(ws, us):
                    v = torch.nn.functional.conv_transpose2d(u, w, padding=1)
                    v = v / v.norm().clamp_min(1e-12)
                    wv = torch.nn.functional.conv2d(v, w, padding=1)
                    sigma = wv.norm()
                    u.copy_(wv / sigma.clamp_min(1e-12))

    return {
        "batched operator": batched("operator", u_op),
        "per-layer operator loop": per_layer_operator,
        "batched matrix": batched("matrix", u_mat),
        "per-layer torch spectral_norm (matrix)": per_layer_matrix,
    }


def run_spectral_benchmark(widths=(16, 64), device="cpu", min_run_time=1.0):
    cases = {w: spectral_cases(resnet_block_convs(width=w, device=device), device) for w in widths}
    report, table = run_comparison(cases, label="one power step, all 96 block convs of ResNet-101",
                                   reference="batched operator", device=device, min_run_time=min_run_time, name="spectral")
    report["gram_seconds"] = {}
    for width in widths:
        by_case = {r["case"]: r["median_s"] for r in report["rows"] if r["width"] == width}
        report["ratios"][f"width {width}"]["per-layer matrix / batched matrix"] = (
            by_case["per-layer torch spectral_norm (matrix)"] / by_case["batched matrix"]
        )
        # The certified bound is far costlier (its kernel doubles per step, cost ~ C^3 k^2): one timed
        # call per step count, at width 16 only (width 64 has 256-channel kernels: minutes).
        if width > 16:
            continue
        slots = resnet_block_convs(width=width, device=device)
        for steps in (3, 4):
            start = time.perf_counter()
            for ws, _ in slots:
                ops.gram_spectral_bound(torch.stack(ws), steps)
            report["gram_seconds"][f"width {width}, {steps} steps"] = time.perf_counter() - start
    return report, label_backend(table)


def gram_tightness(sizes=((3, 3), (8, 8), (16, 16)), channels=4, n_kernels=8, steps=(3, 4, 5, 6), kernels=None, seed=0):
    """bound / exact for random (or given) 3x3 kernels: exact = the materialised operator's 2-norm."""
    gen = torch.Generator().manual_seed(seed)
    if kernels is None:
        kernels = torch.randn(n_kernels, channels, channels, 3, 3, generator=gen, dtype=torch.float64)
    out = {}
    for h, w in sizes:
        c_in = kernels.shape[2]
        n = c_in * h * w
        eye = torch.eye(n, dtype=torch.float64).view(n, c_in, h, w)
        exact = torch.stack([
            torch.linalg.matrix_norm(torch.nn.functional.conv2d(eye, k, padding=1).reshape(n, -1).T, ord=2) for k in kernels
        ])
        for t in steps:
            ratio = ops.gram_spectral_bound(kernels, t) / exact
            out[f"{h}x{w}, {t} steps"] = {"min": ratio.min().item(), "mean": ratio.mean().item(), "max": ratio.max().item()}
    return out


def save_report(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


# ---------------------------------------------------------------------------------------------
# Indices of iterative convergence
# ---------------------------------------------------------------------------------------------


def run_indices_benchmark(configs=((16, 4, 16, 256),), extra_iterations=16, device="cpu", min_run_time=1.0):
    """cached vs reference compute_indices on random-label data; configs: (width, blocks, input side, n).

    Each row also records the block-evaluation counts of both methods (indices.index_flops).
    """
    from .indices import compute_indices, index_flops
    from .models import IterResNet

    cases, flops = {}, {}
    for width, blocks, side, n in configs:
        torch.manual_seed(0)
        model = IterResNet(10, 3, width=width, blocks=blocks, stages=3, input_size=side).to(device).eval()
        x = torch.randn(n, 3, side, side, device=device)
        with torch.no_grad():
            y = model(x).argmax(1)
        y[: n // 4] = (y[: n // 4] + 1) % 10  # an error well below chance, so the indices are defined
        key = f"{width}x{blocks}@{side}px,n={n}"
        cases[key] = {
            method: (lambda m=method, mod=model, data=(x, y): compute_indices(mod, data, extra_iterations=extra_iterations,
                                                                             method=m, batch_size=n))
            for method in ("cached", "reference")
        }
        flops[key] = index_flops(model, extra_iterations)
    report, table = run_comparison(cases, label="compute_indices (S=3, K=16)", reference="cached", device=device,
                                   min_run_time=min_run_time, name="indices", warmup=1)
    report["block_evaluations"] = flops
    return report, label_backend(table)


def run_analysis_benchmark(width=16, blocks=16, side=32, n=1000, extra_iterations=16, device="cpu", min_run_time=0.0,
                           min_rounds=1, batch_size=500):
    """analyze(all measures) against compute_indices alone on ResNet-101-16 (random weights, random-label data):
    the cost of the refinement measures, anytime curves and traces on top of the indices. Each round runs
    each case once (a round of ResNet-101-16 on 1,000 examples takes minutes on a CPU)."""
    from .analysis import analyze
    from .indices import compute_indices
    from .models import IterResNet

    torch.manual_seed(0)
    model = IterResNet(10, 3, width=width, blocks=blocks, stages=3, input_size=side).to(device).eval()
    x = torch.randn(n, 3, side, side, device=device)
    with torch.no_grad():
        y = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, n, batch_size)])
    y[: n // 4] = (y[: n // 4] + 1) % 10
    key = f"{width}x{blocks}@{side}px,n={n}"
    cases = {key: {
        "indices alone": lambda: compute_indices(model, (x, y), extra_iterations=extra_iterations, batch_size=batch_size),
        "all measures": lambda: analyze(model, (x, y), measures="all", extra_iterations=extra_iterations,
                                        batch_size=batch_size),
    }}
    return run_comparison(cases, label="analyze vs compute_indices (S=3, K=16)", reference="indices alone", device=device,
                          min_run_time=min_run_time, name="analysis", warmup=0, block_time=0.0, min_rounds=min_rounds)


# ---------------------------------------------------------------------------------------------
# Training step overhead
# ---------------------------------------------------------------------------------------------


def interleaved_step_times(cases: dict, device: str, min_run_time: float) -> tuple[dict, int]:
    """Every case once for warm-up, then round after round one call of each case in turn (so that drift of a
    shared machine hits all alike) until each had about min_run_time seconds, at least 3 rounds:
    ({case: [seconds per round]}, rounds)."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    start, rounds = time.perf_counter(), 0
    while rounds < 3 or time.perf_counter() - start < min_run_time * len(cases):
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times, rounds


def train_step_cases(width=16, blocks=16, batch=128, device="cpu", lam=0.5, sn_mu=0.95, sn_mode="operator"):
    """One SGD step of ResNet-101-16 (forward, backward, coupling, step) with and without the regularisers."""
    from .coupling import GradientCoupler
    from .models import IterResNet

    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def make(coupled, normalised):
        torch.manual_seed(0)
        model = IterResNet(10, 3, width=width, blocks=blocks, stages=3, sn_mu=sn_mu if normalised else None,
                           sn_mode=sn_mode, init="recurrent" if coupled else "nonrecurrent").to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        coupler = GradientCoupler(model, lam) if coupled else None

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if coupler is not None:
                coupler()
            opt.step()
        return step

    return {
        "plain": make(False, False),
        f"coupling (lam {lam})": make(True, False),
        f"spectral norm ({sn_mode}, 1 power step)": make(False, True),
        "coupling + spectral norm": make(True, True),
    }


def run_train_step_benchmark(width=16, blocks=16, batch=128, device="cpu", min_run_time=10.0, sn_mode="operator"):
    """Step times of every case, interleaved round by round (plain, coupled, normalised, both, plain, ...)
    so that drift of a shared machine hits all cases alike; medians over the rounds."""
    import statistics

    cases = train_step_cases(width, blocks, batch, device, sn_mode=sn_mode)
    times, rounds = interleaved_step_times(cases, device, min_run_time)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    label = f"one training step, ResNet-{6 * blocks + 5}-{width}, batch {batch}"
    rows = [{"width": width, "case": name, "median_s": m, "rounds": rounds,
             "min_s": min(times[name]), "max_s": max(times[name])} for name, m in medians.items()]
    report = {"benchmark": "train-step", "machine": machine_description(device), "rows": rows,
              "ratios": {f"width {width}": {n: m / medians["plain"] for n, m in medians.items() if n != "plain"}}}
    table = "\n".join([f"[{label}, interleaved, {rounds} rounds]"] +
                      [f"  {name:42s} median {m * 1e3:9.1f} ms  (min {min(times[name]) * 1e3:.1f}, max {max(times[name]) * 1e3:.1f})"
                       for name, m in medians.items()])
    return report, label_backend(table)


# ---------------------------------------------------------------------------------------------
# Drop-in spectral normalization on torchvision-like ResNets (itconv_fast.nn)
# ---------------------------------------------------------------------------------------------

LIPSCHITZ_CASES = ("plain", "(a) torch spectral_norm per layer (matrix)", "(b) itconv_fast.nn.spectral_norm per layer (matrix)",
                   "(c) BatchedSpectralNorm (matrix)", "(b) itconv_fast.nn.spectral_norm per layer (operator)",
                   "(c) BatchedSpectralNorm (operator)")


def lipschitz_step_cases(arch="resnet18", batch=8, size=128, device="cpu", cases=LIPSCHITZ_CASES):
    """One SGD step (forward, backward, step) of a torchvision-like ResNet with every spectral-norm variant
    on all its Conv2d and Linear layers: {case: step function}."""
    from . import nn as inn
    from . import zoo

    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def make(case):
        torch.manual_seed(0)
        model = getattr(zoo, arch)().to(device).train()
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        mode = "operator" if "operator" in case else "matrix"
        if case.startswith("(a)"):
            for _, m in layers:
                torch.nn.utils.parametrizations.spectral_norm(m)
        elif case.startswith("(b)"):
            for n, m in layers:
                inn.spectral_norm(m, mode=mode, name=n)
        elif case.startswith("(c)"):
            inn.BatchedSpectralNorm(model, mode=mode)
        if case != "plain":  # operator mode learns the input sizes here; the groups form after it
            model.eval()
            with torch.no_grad():
                model(x[:1])
            model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return step

    return {case: make(case) for case in cases}


def run_lipschitz_benchmark(archs=("resnet18", "resnet50"), batch=8, size=128, device="cpu", min_run_time=5.0,
                            cases=LIPSCHITZ_CASES):
    """Step times of every case per architecture, interleaved round by round; the overhead of each variant
    over the plain step, and its ratio to torch's per-layer overhead."""
    import statistics

    rows, tables, ratios = [], [], {}
    for arch in archs:
        fns = lipschitz_step_cases(arch, batch, size, device, cases)
        times, rounds = interleaved_step_times(fns, device, min_run_time)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        # Overheads paired round by round (case - plain of the same round), then the median: the drift of a
        # shared machine between rounds cancels, which a difference of two medians would keep.
        paired = {name: statistics.median(t - p for t, p in zip(ts, times["plain"])) for name, ts in times.items()}
        torch_overhead = paired.get(LIPSCHITZ_CASES[1], float("nan"))
        setting = f"{arch}, batch {batch}, {size}x{size}"
        ratios[setting] = {}
        lines = [f"[one training step, {setting}, interleaved, {rounds} rounds]"]
        for name, m in med.items():
            overhead = paired[name]
            rel = overhead / torch_overhead if name != "plain" else float("nan")
            rows.append({"setting": setting, "case": name, "median_s": m, "overhead_s": overhead,
                         "overhead_vs_torch": rel, "rounds": rounds, "min_s": min(times[name]), "max_s": max(times[name])})
            if name != "plain":
                ratios[setting][name] = rel
            lines.append(f"  {name:55s} {m * 1e3:9.1f} ms  overhead {overhead * 1e3:8.1f} ms"
                         + (f"  ({rel:.2f}x torch's)" if name != "plain" else ""))
        tables.append("\n".join(lines))
    report = {"benchmark": "lipschitz", "machine": machine_description(device), "rows": rows,
              "overhead_vs_torch": ratios,
              "method": "cases interleaved round by round; medians; overhead = median over rounds of (case - plain)"}
    return report, label_backend("\n".join(tables))


# ---------------------------------------------------------------------------------------------
# Everything at once: `itconv-fast bench`
# ---------------------------------------------------------------------------------------------

# Case names of the comparisons -> (op, variant, baseline) of the combined report. The copy is a memory
# floor, not a rival implementation.
_COUPLING = {"(a) per-slot loop": "per_slot_loop", "(b) _foreach": "foreach",
             "(c) torch.compile(reference)": "torch_compile", "(d) copy (memory floor)": "copy"}
_TRAIN_STEP = {"coupling": "coupling", "spectral norm": "spectral_norm", "coupling + spectral norm": "coupling+spectral_norm"}


# The combined report compares like with like: the matrix-mode drop-ins against torch's (same quantity).
# Operator mode computes the true norm, which torch does not offer; its overhead against torch's is in
# `itconv-fast bench lipschitz` (the goal there: at most 2x).
_LIPSCHITZ = {LIPSCHITZ_CASES[2]: "per_layer_matrix", LIPSCHITZ_CASES[3]: "batched_matrix"}


def _entry(op, variant, baseline, setting, median_s, baseline_median_s):
    return {"op": op, "variant": variant, "baseline": baseline, "setting": setting, "median_s": median_s,
            "baseline_median_s": baseline_median_s, "speedup": baseline_median_s / median_s}


def run_all(quick: bool = False, device: str = "cpu", log=print) -> dict:
    """Every comparison of the bench subcommands, one after another, as {"machine", "results", "tables"}.
    quick: smaller settings (width 16 only, short timing, a small indices network), under 3 minutes on 2 cores."""
    widths = (16,) if quick else (16, 64)
    run_time = 0.3 if quick else 1.0
    results, tables = [], []

    log("soft_couple ...")
    report, table = run_coupling_benchmark(widths=widths, device=device, min_run_time=run_time)
    tables.append(table)
    for width in widths:
        rows = {r["case"]: r["median_s"] for r in report["rows"] if r["width"] == width}
        for case, baseline in _COUPLING.items():
            if case in rows:
                results.append(_entry("soft_couple", "fused", baseline, f"ResNet-101-{width} gradients",
                                      rows["fused soft_couple_"], rows[case]))

    log("spectral_norm ...")
    report, table = run_spectral_benchmark(widths=widths, device=device, min_run_time=run_time)
    tables.append(table)
    for width in widths:
        rows = {r["case"]: r["median_s"] for r in report["rows"] if r["width"] == width}
        setting = f"ResNet-101-{width}, 96 convs, 1 power step"
        results.append(_entry("spectral_norm", "batched_operator", "per_layer_operator", setting,
                              rows["batched operator"], rows["per-layer operator loop"]))
        results.append(_entry("spectral_norm", "batched_matrix", "torch_spectral_norm", setting,
                              rows["batched matrix"], rows["per-layer torch spectral_norm (matrix)"]))

    log("indices ...")
    configs = [(8, 4, 32, 64)] if quick else [(8, 4, 32, 256), (16, 16, 32, 16)]
    report, table = run_indices_benchmark(configs, device=device, min_run_time=run_time)
    tables.append(table)
    for key in report["ratios"]:
        rows = {r["case"]: r["median_s"] for r in report["rows"] if str(r["width"]) == key}
        results.append(_entry("indices", "cached", "reference", key, rows["cached"], rows["reference"]))

    log("train_step ...")
    width, blocks, batch = (8, 4, 64) if quick else (16, 16, 128)
    report, table = run_train_step_benchmark(width, blocks, batch, device, min_run_time=1.0 if quick else 10.0)
    tables.append(table)
    rows = {r["case"]: r["median_s"] for r in report["rows"]}
    for case, median in rows.items():
        if case == "plain":
            continue
        variant = next(v for prefix, v in sorted(_TRAIN_STEP.items(), key=lambda kv: -len(kv[0])) if case.startswith(prefix))
        results.append(_entry("train_step", variant, "plain_step", f"ResNet-{6 * blocks + 5}-{width}, batch {batch}",
                              median, rows["plain"]))
    log("lipschitz ...")
    archs, batch, size = (("resnet18",), 4, 64) if quick else (("resnet18", "resnet50"), 8, 128)
    report, table = run_lipschitz_benchmark(archs, batch, size, device, min_run_time=1.0 if quick else 5.0)
    tables.append(table)
    for setting in report["overhead_vs_torch"]:
        over = {r["case"]: r["overhead_s"] for r in report["rows"] if r["setting"] == setting}
        torch_case = LIPSCHITZ_CASES[1]
        for case, variant in _LIPSCHITZ.items():
            if case in over and torch_case in over:
                results.append(_entry("spectral_norm_drop_in", variant, "torch_spectral_norm",
                                      f"{setting}, training-step overhead", over[case], over[torch_case]))
    return {"machine": machine_description(device), "quick": quick, "results": results, "tables": tables}


def results_markdown(report: dict) -> str:
    """The combined report as markdown: the machine, then one row per comparison."""
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} threads), CPU clone {m.get('cpu_isa', '?')}"
             + (f", GPU {m['device']}" if m.get("device", "cpu") != "cpu" else "")
             + f"; torch {m['torch']}; {m['backend']}; {m['date']}" + ("; --quick" if report.get("quick") else ""), "",
             "| op | setting | variant | baseline | time | baseline time | speed-up |", "|---|---|---|---|---|---|---|"]

    def t(sec):
        return f"{sec * 1e3:.3g} ms" if sec < 1 else f"{sec:.3g} s"

    for r in report["results"]:
        note = " (floor)" if r["baseline"] == "copy" else (" (overhead)" if r["baseline"] == "plain_step" else "")
        if r["op"] == "spectral_norm_drop_in":
            note = " (overheads)"
        lines.append(f"| {r['op']} | {r['setting']} | {r['variant']} | {r['baseline']}{note} | {t(r['median_s'])} | "
                     f"{t(r['baseline_median_s'])} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"
