"""Step times of the paper's ResNet (default ResNet-101-16, batch 128, 32 x 32 inputs) eager, compiled and
compiled with CUDA graphs (mode="reduce-overhead"), plain and with coupling (lam 0.5) + spectral normalization
(mu 0.95), on one device; and whether the compiled and CUDA-graph steps give the eager step's losses (the
coupling and spectral-norm ops are capture-safe by design: no host synchronisation, no allocation of their own).

    python benchmarks/compiled_step_probe.py [--device cuda] [--steps 30] [--width 16 --blocks 16]
        [--modes eager,default,reduce-overhead] [--regularised both|plain|regularised] [--out FILE]

Each case: its first step timed alone (compilation included), then `--steps` steps after 5 warm-up steps,
synchronised; the median step and the loss after a fixed sequence of steps from the same weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def make_step(device, *, regularised: bool, compile_mode, width: int = 16, blocks: int = 16):
    from itconv_fast.models import IterResNet
    from itconv_fast.nn.coupling import GradientCoupler

    torch.manual_seed(0)
    model = (
        IterResNet(
            10,
            3,
            width=width,
            blocks=blocks,
            stages=3,
            sn_mu=0.95 if regularised else None,
            init="recurrent" if regularised else "nonrecurrent",
        )
        .to(device)
        .train()
    )
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    coupler = GradientCoupler(model, 0.5) if regularised else None
    net = model if compile_mode is None else torch.compile(model, mode=compile_mode)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        if coupler is not None:
            coupler()
        opt.step()
        return loss.detach()

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--modes", default="eager,default,reduce-overhead")
    parser.add_argument("--regularised", choices=("both", "plain", "regularised"), default="both")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    probe(args.device, args.steps, args.width, args.blocks, args.modes.split(","), args.regularised, args.out)
    return 0


def probe(
    device, steps=30, width=16, blocks=16, modes=("eager", "default", "reduce-overhead"), regularised="both", out=None
) -> dict:
    """Runs the cases; returns {"device", "torch", "rows"} (rows also printed as JSON lines)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)) for _ in range(4)]
    data = [(x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)) for x, y in data]
    rows = []
    eager_losses = {}
    for reg in {"both": (False, True), "plain": (False,), "regularised": (True,)}[regularised]:
        for mode in modes:
            mode = None if mode == "eager" else mode
            name = f"ResNet-{6 * blocks + 5}-{width}, {'lam 0.5 + mu 0.95' if reg else 'plain'}, {mode or 'eager'}"
            try:
                step = make_step(device, regularised=reg, compile_mode=mode, width=width, blocks=blocks)
                sync(device)
                t0 = time.perf_counter()
                step(*data[0])
                sync(device)
                first = time.perf_counter() - t0
                for i in range(5):
                    step(*data[(i + 1) % 4])
                losses = []
                times = []
                for i in range(steps):
                    sync(device)
                    t0 = time.perf_counter()
                    loss = step(*data[i % 4])
                    sync(device)
                    times.append(time.perf_counter() - t0)
                    losses.append(float(loss))
                if mode is None:
                    eager_losses[reg] = losses
                reference = eager_losses.get(reg)
                row = {
                    "case": name,
                    "first_step_s": first,
                    "median_step_s": statistics.median(times),
                    "min_step_s": min(times),
                    "last_loss": losses[-1],
                    "max_loss_difference_to_eager": (
                        max(abs(a - b) for a, b in zip(losses, reference)) if reference else None
                    ),
                }
            except Exception as error:  # recorded: a failing mode is a finding, not the end of the probe
                row = {"case": name, "error": f"{type(error).__name__}: {str(error)[:1500]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "rows": rows,
    }
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    sys.exit(main())
