"""`itconv-fast bench train`: epoch times of `itconv-fast train` against the plain PyTorch loop (plain_loop.py).

Per size, five runs train side by side, each in a process of its own (as a script runs: its own model, data
and allocator state), their epochs interleaved (round r runs epoch r of every run, in an order that rotates
each round, so that drift of a shared machine hits all alike):

    plain loop                   eager, no coupling, no spectral normalization (the baseline)
    train lam 0                  itconv-fast train, eager, no coupling, no spectral normalization
    train lam 0.5 + mu 0.95      itconv-fast train, eager, coupling + spectral normalization (operator mode)
    (the same two compiled)      --compile on

An epoch's time is its training pass (`train_seconds`; evaluation, checkpoints and logs excluded). The first
epoch is reported apart (it holds compilation and warm-up); the others give the median. Ratios come two ways:
of the medians, and paired (the median over rounds of the two runs' ratio within a round, which cancels the
drift between rounds that the interleaving is there for: on the 2-core machine it narrowed the spread of the
overhead between repeated runs from 6.3 points to 2.5; benchmarks/NOTES.md). From the medians the report derives
each compiled run's compilation time (its first epoch's excess over the eager run's) and the break-even step
count of compiling (compilation time / time saved per step), which `--compile auto` uses.

Sizes: "quick" is the quick preset (Digitclutter, ResNet-29-8, 93 steps an epoch); "paper" is the paper's
width and depth, ResNet-101-16 on 32 x 32 x 3 CIFAR-shaped random images (`paper_steps` steps an epoch,
nothing downloaded, CIFAR's augmentation on).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from .plain_loop import SIZES, plain_run, train_benchmark_task, train_benchmark_values
from .runner import label_backend, machine_description

__all__ = ["SIZES", "TRAIN_CASES", "run_train_benchmark"]
PLAIN = "plain loop (eager)"
TRAIN_CASES = {  # name: (lam, sn_mu, compile)
    "train lam 0 (eager)": (0.0, None, False),
    "train lam 0.5 + mu 0.95 (eager)": (0.5, 0.95, False),
    "train lam 0 (compiled)": (0.0, None, True),
    "train lam 0.5 + mu 0.95 (compiled)": (0.5, 0.95, True),
}


def _case_epochs(case: str, size: str, *, epochs: int, device: str, paper_steps: int, quick_train_size, workdir: str):
    """The epoch iterator of one case (run in its own process by EpochProcess)."""
    from ..experiments.config import build_config
    from ..experiments.training import train_epochs

    if case == PLAIN:
        return plain_run(size, epochs=epochs, device=device, paper_steps=paper_steps, quick_train_size=quick_train_size)
    task, values = train_benchmark_task(size, paper_steps=paper_steps, quick_train_size=quick_train_size)
    lam, mu, compile_ = TRAIN_CASES[case]
    config = build_config(
        size, {**values, "epochs": epochs, "lam": lam, "sn_mu": mu, "compile": compile_, "device": device}
    )
    return train_epochs(config, workdir, progress=False, task=task)


def _child(argv=None) -> int:
    """A case's process: waits for a line on stdin before each epoch and prints the epoch's record as JSON."""
    spec = json.loads((argv or sys.argv[1:])[0])
    epochs = _case_epochs(spec.pop("case"), spec.pop("size"), **spec)
    for _ in range(spec["epochs"]):
        if not sys.stdin.readline():
            return 0
        print(json.dumps(next(epochs)), flush=True)
    return 0


class EpochProcess:
    """One case of the benchmark in a process of its own, one epoch per next(): every run, ours and the plain loop,
    starts from a fresh interpreter with only its own model, data and allocator state, as a script does (several
    models in one process measured up to 1.25x apart from alone on this machine)."""

    def __init__(self, case: str, size: str, **spec) -> None:
        run = "import sys; from itconv_fast.bench.train_loop import _child; sys.exit(_child())"
        payload = json.dumps({"case": case, "size": size, **spec})
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        self.process = subprocess.Popen(
            [sys.executable, "-c", run, payload], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def __next__(self) -> dict:
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError(f"a benchmark run's process ended (exit code {self.process.returncode})")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _runs(
    size: str, epochs: int, device: str, workdir: str, compiled: bool, paper_steps: int, quick_train_size
) -> dict:
    names = [PLAIN] + [name for name, (_, _, compile_) in TRAIN_CASES.items() if compiled or not compile_]
    return {
        name: EpochProcess(
            name,
            size,
            epochs=epochs,
            device=device,
            paper_steps=paper_steps,
            quick_train_size=quick_train_size,
            workdir=os.path.join(workdir, f"run{i}"),
        )
        for i, name in enumerate(names)
    }


def run_train_benchmark(
    sizes=SIZES,
    *,
    device: str = "cpu",
    epochs: int = 3,
    paper_steps: int = 200,
    quick_train_size=None,
    compiled: bool = True,
    log=print,
) -> tuple[dict, str]:
    """Epoch times of the plain loop and itconv-fast train (see the module's text) for each size; returns
    (JSON-ready report in `bench`'s schema, table). compiled=False leaves the compiled runs out."""
    if epochs < 2:
        raise ValueError("bench train: epochs must be >= 2 (the first holds compilation and warm-up)")
    rows, ratios, paired_ratios, tables = [], {}, {}, []
    for size in sizes:
        values = train_benchmark_values(size, paper_steps=paper_steps, quick_train_size=quick_train_size)
        if size == "quick":  # Digitclutter is generated and cached once here, not by the five processes at once
            train_benchmark_task(size, quick_train_size=quick_train_size)
        steps = values["train_size"] // values["batch_size"]
        label = (
            f"{size}: ResNet-{6 * values['blocks'] + 5}-{values['width']}, batch {values['batch_size']}, "
            f"{steps} steps an epoch"
        )
        with tempfile.TemporaryDirectory(prefix="itconv-bench-train-") as workdir:
            runs = _runs(size, epochs, device, workdir, compiled, paper_steps, quick_train_size)
            records = {name: [] for name in runs}
            names = list(runs)
            for r in range(epochs):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    t0 = time.perf_counter()
                    records[name].append(next(runs[name]))
                    log(
                        f"  {size} epoch {r + 1}/{epochs} {name}: {records[name][-1]['train_seconds']:.2f} s "
                        f"(wall {time.perf_counter() - t0:.1f} s)"
                    )
            for run in runs.values():
                run.close()
        medians = {n: statistics.median(e["train_seconds"] for e in recs[1:]) for n, recs in records.items()}
        firsts = {n: recs[0]["train_seconds"] for n, recs in records.items()}
        for name in runs:
            rows.append(
                {
                    "size": size,
                    "case": name,
                    "steps_per_epoch": steps,
                    "median_epoch_s": medians[name],
                    "median_step_s": medians[name] / steps,
                    "first_epoch_s": firsts[name],
                    "epochs_timed": epochs - 1,
                    "epoch_s": [e["train_seconds"] for e in records[name]],
                    "last_test_error": records[name][-1]["test_error"],
                }
            )
        timed = {n: [e["train_seconds"] for e in recs[1:]] for n, recs in records.items()}

        def paired_ratio(a, b, timed=timed):  # the median over rounds of a's epoch time over b's, the same round
            return statistics.median(x / y for x, y in zip(timed[a], timed[b]))

        ratio = {n: medians[n] / medians[PLAIN] for n in medians if n != PLAIN}
        paired = {n: paired_ratio(n, PLAIN) for n in medians if n != PLAIN}
        for variant in ("eager", "compiled") if compiled else ("eager",):
            plain_ours, regularised = f"train lam 0 ({variant})", f"train lam 0.5 + mu 0.95 ({variant})"
            key = f"overhead of coupling + spectral norm ({variant})"
            ratio[key] = medians[regularised] / medians[plain_ours] - 1
            paired[key] = paired_ratio(regularised, plain_ours) - 1
        for lam in ("lam 0", "lam 0.5 + mu 0.95") if compiled else ():
            eager, fast = medians[f"train {lam} (eager)"], medians[f"train {lam} (compiled)"]
            compile_s = (firsts[f"train {lam} (compiled)"] - fast) - (firsts[f"train {lam} (eager)"] - eager)
            saved = (eager - fast) / steps
            ratio[f"compilation seconds ({lam})"] = compile_s
            ratio[f"break-even steps ({lam})"] = compile_s / saved if saved > 0 else float("inf")
        ratios[size], paired_ratios[size] = ratio, paired
        lines = [f"[{label}; epoch = training pass; median of {epochs - 1} epochs after the first, interleaved]"]
        for name in runs:
            pair = f", paired {paired[name]:.3f}x" if name in paired else ""
            lines.append(
                f"  {name:38s} {medians[name]:8.2f} s/epoch  {medians[name] / steps * 1e3:8.1f} ms/step  "
                f"{medians[name] / medians[PLAIN]:5.2f}x plain{pair}  (first epoch {firsts[name]:.1f} s)"
            )
        for key, value in ratio.items():
            if key.startswith(("overhead", "compilation", "break-even")):
                text = f"{value * 100:+.1f}%" if key.startswith("overhead") else f"{value:.0f}"
                if key in paired:
                    text += f" (paired {paired[key] * 100:+.1f}%)"
                lines.append(f"  {key:58s} {text}")
        tables.append("\n".join(lines))
        log(tables[-1])
    report = {
        "benchmark": "train",
        "machine": machine_description(device),
        "rows": rows,
        "ratios": ratios,
        "paired_ratios": paired_ratios,
        "method": "runs interleaved epoch by epoch (rotating order); median training-pass time of the epochs "
        "after the first; ratios of those medians, and paired: the median over rounds of the "
        "ratio of two runs' epoch times in the same round",
    }
    return report, label_backend("\n\n".join(tables))
