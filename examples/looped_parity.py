"""Running parity of bit strings with a looped (weight-shared) residual network, evaluated at more iterations
than it was trained with, and on longer strings than it was trained on.

The task (generated in code): for a bit string b_1 .. b_L, predict at every position i the parity
b_1 xor ... xor b_i. Each block sees three neighbours per convolution, so information travels at most two
positions per iteration: longer strings need more iterations, the setting of the looped-model literature
(Schwarzschild et al. 2021, "Can you learn an algorithm?", prefix sums of bit strings).

The model is a `ResidualStack` of the user's own modules: a stem (bits -> W channels per position), one stage
of T residual functions f_t = conv-ReLU-conv (1-D, kernel 3), a per-position linear head (2 classes). With
lam = 1 the blocks start as copies of one block and `GradientCoupler(stack, 1.0)` keeps them identical: a
recurrent network; lam = 0 trains T independent blocks for comparison. Outputs are [N, L, 2] logits,
scored per token by `residual.sequence_error` / `sequence_loss` (the mean over the string's positions).

After training on strings of length --train-length with T iterations, `analyze` gives the anytime curve
k = 1 .. T + K (k > T repeats the last block, the stage's own block for lam = 1) on held-out strings of the
training length and of --test-lengths, and the fixed-point traces of the last block.

--objective NAME:WEIGHT adds an objective of `itconv_fast.objectives` to the loss, in this script's own loop
(record the stages during the forward, build an ObjectiveContext, add weight * term), e.g. the extra-iteration
("progressive") loss of Bansal et al. 2022, which asks the output to stay right for up to --objective-k more
iterations of the last block.

    python examples/looped_parity.py --out docs/transformers/parity [--lams 0 1] [--steps 1500]
    python examples/looped_parity.py --out docs/transformers/parity-extra-iterations --lams 1 \
        --objective extra-iterations:1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from torch import nn

from itconv_fast import GradientCoupler, ResidualStack
from itconv_fast.measures.analysis import analyze
from itconv_fast.models.residual import sequence_error, sequence_loss
from itconv_fast.objectives import ObjectiveContext, make_objective, record_stages


def parity_data(n: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random bit strings [n, length] (float 0/1) and their running parities [n, length] (long)."""
    bits = torch.randint(0, 2, (n, length), generator=generator)
    return bits.float(), bits.cumsum(1).remainder(2)


class BitStem(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, width, 3, padding=1)

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        return self.conv(2 * bits[:, None, :] - 1)  # [N, W, L]


class Step(nn.Module):
    """f(z): conv-ReLU-conv, kernel 3, the state's width in and out."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(width, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(torch.relu(z))))


class TokenHead(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.out = nn.Conv1d(width, 2, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(z)).transpose(1, 2)  # [N, L, 2]


def build(width: int, iterations: int, lam: float, seed: int) -> ResidualStack:
    torch.manual_seed(seed)
    if lam > 0:  # recurrent initialisation: every block a copy of the first
        first = Step(width)
        steps = [first] + [copy.deepcopy(first) for _ in range(iterations - 1)]
    else:
        steps = [Step(width) for _ in range(iterations)]
    return ResidualStack(BitStem(width), [steps], TokenHead(width))


def block_spread(stack: ResidualStack) -> float:
    blocks = [b.f for b in stack.stages[0].blocks]
    first = dict(blocks[0].named_parameters())
    return max(
        ((dict(b.named_parameters())[k] - p).abs().max().item() for b in blocks[1:] for k, p in first.items()),
        default=0.0,
    )


def train_one(lam: float, args) -> tuple[ResidualStack, list]:
    stack = build(args.width, args.iterations, lam, args.seed)
    coupler = GradientCoupler(stack, lam)
    optimizer = torch.optim.AdamW(stack.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed + 1)
    objectives = [make_objective(name, weight, k=args.objective_k) for name, weight in args.objective]
    history, start, running, last = [], time.perf_counter(), 0.0, 0
    stack.train()
    for step in range(1, args.steps + 1):
        bits, target = parity_data(args.batch_size, args.train_length, generator)
        with record_stages(stack) as stages:
            logits = stack(bits)
        loss = sequence_loss(logits, target).mean()
        total = loss
        if objectives:
            context = ObjectiveContext(
                stack,
                stages.inputs,
                stages.outputs,
                bits,
                target,
                lambda out, y: sequence_loss(out, y).mean(),
                generator,
            )
            total = total + sum(o.weight * o(context).value for o in objectives)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(stack.parameters(), 1.0)
        coupler()
        optimizer.step()
        schedule.step()
        running += loss.item()
        if step % args.log_every == 0 or step == args.steps:
            history.append(
                {"step": step, "train_loss": running / (step - last), "seconds": time.perf_counter() - start}
            )
            running, last = 0.0, step
            print(f"lam {lam}: step {step}: train loss {history[-1]['train_loss']:.4f}", flush=True)
    return stack, history


def _objective(text: str) -> tuple[str, float]:
    name, _, weight = text.partition(":")
    return name, float(weight)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for results.json and parity.png")
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=12, help="T: iterations (blocks) in training")
    parser.add_argument("--train-length", type=int, default=16)
    parser.add_argument("--test-lengths", type=int, nargs="+", default=[32, 48])
    parser.add_argument("--extra", type=int, default=36, help="K: extra iterations in evaluation (k up to T + K)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--objective",
        type=_objective,
        action="append",
        default=[],
        metavar="NAME:WEIGHT",
        help="an extra loss term of itconv_fast.objectives (repeatable), e.g. extra-iterations:1",
    )
    parser.add_argument("--objective-k", type=int, default=12, help="K_train of extra-iterations")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed + 1000)  # held-out strings, a separate stream
    lengths = [args.train_length] + [n for n in args.test_lengths if n != args.train_length]
    test = {n: parity_data(args.test_size, n, generator) for n in lengths}
    results = {
        "task": "running parity",
        "train_length": args.train_length,
        "iterations": args.iterations,
        "objectives": dict(args.objective),
        "objective_k": args.objective_k,
        "extra": args.extra,
        "width": args.width,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "threads": torch.get_num_threads(),
        "runs": [],
    }
    curves = []
    for lam in args.lams:
        stack, history = train_one(lam, args)
        run = {"lam": lam, "history": history, "block_spread": block_spread(stack), "lengths": {}}
        for n, data in test.items():
            report = analyze(
                stack,
                data,
                measures=("indices", "anytime", "traces"),
                extra_iterations=args.extra,
                chance_error=0.5,
                error_fn=sequence_error,
                loss_fn=sequence_loss,
            )
            stage = report.stages[0]
            errors = stage.anytime_error
            best = min(range(len(errors)), key=errors.__getitem__)
            run["lengths"][str(n)] = {
                "error_at_T": errors[args.iterations - 1],
                "best_error": errors[best],
                "best_k": best + 1,
                "error_at_T_plus_K": errors[-1],
                "anytime_error": errors,
                "indices": report.indices.to_dict(),
                "fixed_point_residual_median": stage.trace["fixed_point_residual"]["median"],
            }
            curves.append((lam, n, errors))
            print(
                f"lam {lam}, length {n}: token error at k=T={args.iterations}: {errors[args.iterations - 1]:.3f}; "
                f"best {errors[best]:.3f} at k={best + 1}; at k={len(errors)}: {errors[-1]:.3f}",
                flush=True,
            )
        results["runs"].append(run)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    note = ", ".join(
        f"{name} x {weight:g}" + (f" (K_train {args.objective_k})" if name == "extra-iterations" else "")
        for name, weight in args.objective
    )
    plot(curves, args.iterations, os.path.join(args.out, "parity.png"), note)
    return results


def plot(curves, T: int, path: str, note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = sorted({lam for lam, _, _ in curves})
    fig, axes = plt.subplots(1, len(lams), figsize=(5 * len(lams), 3.6), sharey=True, squeeze=False)
    for ax, lam in zip(axes[0], lams):
        for _, n, errors in (c for c in curves if c[0] == lam):
            ax.plot(range(1, len(errors) + 1), errors, marker="o", ms=2, label=f"length {n}")
        ax.axvline(T, color="grey", ls=":", lw=1)
        ax.axhline(0.5, color="grey", ls="--", lw=1)
        ax.set(
            title=f"lam {lam:g}" + (" (weight-shared)" if lam == 1 else "") + (f"\n+ {note}" if note else ""),
            xlabel="iterations k (trained: T)",
            ylim=(0, 0.6),
        )
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("token error (running parity)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
