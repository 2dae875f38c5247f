"""A small vision transformer on Digitclutter, trained with soft gradient coupling (lam in {0, 0.5, 1}), and
its iterative-convergence measures: the three indices, the anytime curve (k = 1 .. T + K encoder iterations,
k > T repeating the last layer) and the fixed-point traces, plus the cached evaluator's speed against the
reference evaluator on the same model.

The ViT: 8 x 8 patches of the 32 x 32 image (16 tokens) and a class token, learned position embeddings, a
pre-norm `nn.TransformerEncoder` of T layers (width 64, 4 heads), a final LayerNorm and a linear read-out of
the class token. `transformer_encoder_adapter` makes it a residual model (one stage, its layers the blocks);
`GradientCoupler(stack, lam)` couples the layers' gradients after every backward pass. The encoder's layers
start as copies of one layer (nn.TransformerEncoder clones its layer), the recurrent initialisation the paper
uses for lam > 0; for lam = 0 every layer is re-initialised independently.

    python examples/vit_digitclutter.py --out docs/transformers/vit [--lams 0 0.5 1] [--epochs 12]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn

from itconv_fast import GradientCoupler, transformer_encoder_adapter
from itconv_fast.data import datasets
from itconv_fast.measures.analysis import analyze
from itconv_fast.measures.indices import compute_indices


class PatchStem(nn.Module):
    """Image -> tokens: a class token and one token per 8 x 8 patch, with position embeddings."""

    def __init__(self, width: int, patch: int = 8, image: int = 32, channels: int = 1) -> None:
        super().__init__()
        self.patch = nn.Conv2d(channels, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.randn(1, 1 + (image // patch) ** 2, width) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.position


class ClassTokenHead(nn.Module):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(z[:, 0]))


class ViT(nn.Module):
    def __init__(
        self, layers: int = 4, width: int = 64, heads: int = 4, classes: int = 10, recurrent_init: bool = True
    ):
        super().__init__()
        self.stem = PatchStem(width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        if not recurrent_init:
            for block in self.encoder.layers:  # independent initialisations (the clones start identical)
                for module in block.modules():
                    if module is not block and hasattr(module, "reset_parameters"):
                        module.reset_parameters()
                block.self_attn._reset_parameters()
        self.head = ClassTokenHead(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.stem(x)))

    def residual_model(self):
        return transformer_encoder_adapter(self.encoder, self.stem, self.head)


def per_example_loss(task):
    def loss(logits, y):
        if task.multilabel:
            return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(1)
        return nn.functional.cross_entropy(logits, y, reduction="none")

    return loss


def train_one(task, lam: float, args) -> tuple[ViT, list]:
    torch.manual_seed(args.seed)
    model = ViT(args.layers, args.width, classes=task.num_classes, recurrent_init=lam > 0)
    coupler = GradientCoupler(model.residual_model(), lam)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * -(-len(task.train) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    for epoch in range(args.epochs):
        model.train()
        start, total, seen = time.perf_counter(), 0.0, 0
        for x, y in datasets.batches(task, task.train, args.batch_size, train=True, generator=generator):
            loss = task.loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            coupler()
            optimizer.step()
            schedule.step()
            total, seen = total + loss.item() * x.shape[0], seen + x.shape[0]
        error = test_error(model, task)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": total / seen,
                "test_error": error,
                "seconds": time.perf_counter() - start,
            }
        )
        print(f"lam {lam}: epoch {epoch + 1}: train loss {total / seen:.3f}, test error {error:.3f}", flush=True)
    return model, history


@torch.no_grad()
def test_error(model, task) -> float:
    model.eval()
    wrong = sum(
        (~task.correct(model(x), y)).sum().item() for x, y in datasets.batches(task, task.test, 500, train=False)
    )
    return wrong / len(task.test)


def layer_spread(model: ViT) -> float:
    """max over parameters of max |layer_t - layer_0|: 0 for a weight-shared (lam = 1) network."""
    layers = list(model.encoder.layers)
    first = dict(layers[0].named_parameters())
    return max(
        ((dict(b.named_parameters())[k] - p).abs().max().item() for b in layers[1:] for k, p in first.items()),
        default=0.0,
    )


def evaluator_speed(stack, data, error_fn, extra: int) -> dict:
    """Seconds of compute_indices, cached against reference, interleaved (best of 2 rounds each)."""
    times = {"cached": [], "reference": []}
    for _ in range(2):
        for method in times:
            start = time.perf_counter()
            compute_indices(stack, data, extra_iterations=extra, method=method, error_fn=error_fn)
            times[method].append(time.perf_counter() - start)
    best = {m: min(t) for m, t in times.items()}
    return {"cached_s": best["cached"], "reference_s": best["reference"], "speedup": best["reference"] / best["cached"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for results.json and vit.png")
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--extra", type=int, default=8, help="K: extra iterations of the last layer")
    parser.add_argument("--speed-examples", type=int, default=500, help="examples for the evaluator timing (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    task = datasets.load(
        "digitclutter",
        train_size=args.train_size,
        test_size=args.test_size,
        seed=args.seed,
        cache_dir=datasets.default_cache_dir(),
    )
    x, y = next(datasets.batches(task, task.test, len(task.test), train=False))

    def wrong(logits, targets):
        return ~task.correct(logits, targets)

    results = {
        "model": {"layers": args.layers, "width": args.width, "patch": 8, "heads": 4, "norm_first": True},
        "train": {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "train_size", "test_size", "seed")},
        "chance_error": task.chance_error,
        "threads": torch.get_num_threads(),
        "runs": [],
    }
    reports = []
    for lam in args.lams:
        model, history = train_one(task, lam, args)
        stack = model.residual_model()
        report = analyze(
            stack,
            (x, y),
            measures=("indices", "anytime", "traces"),
            extra_iterations=args.extra,
            chance_error=task.chance_error,
            error_fn=wrong,
            loss_fn=per_example_loss(task),
        )
        run = {
            "lam": lam,
            "history": history,
            "test_error": history[-1]["test_error"],
            "layer_spread": layer_spread(model),
            "analysis": report.to_dict(),
        }
        if args.speed_examples:
            data = (x[: args.speed_examples], y[: args.speed_examples])
            run["evaluator_speed"] = evaluator_speed(stack, data, wrong, args.extra)
        i = report.indices
        print(
            f"lam {lam}: error {run['test_error']:.3f}, CI {i.ci:.2f}, RI {i.ri:.2f}, DI {i.di:.2f}, "
            f"layer spread {run['layer_spread']:.2g}"
            + (
                f", cached evaluator {run['evaluator_speed']['speedup']:.2f}x the reference"
                if args.speed_examples
                else ""
            ),
            flush=True,
        )
        results["runs"].append(run)
        reports.append((lam, report))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(reports, task.chance_error, args.layers, os.path.join(args.out, "vit.png"))
    return results


def plot(reports, chance: float, T: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_any, ax_res) = plt.subplots(1, 2, figsize=(10, 3.8))
    for lam, report in reports:
        stage = report.stages[0]
        ks = range(1, len(stage.anytime_error) + 1)
        ax_any.plot(ks, stage.anytime_error, marker="o", ms=3, label=f"lam {lam:g} (DI {report.indices.di:.2f})")
        residual = stage.trace["fixed_point_residual"]["median"]
        ax_res.semilogy(range(T, T + len(residual)), residual, marker="o", ms=3, label=f"lam {lam:g}")
    ax_any.axvline(T, color="grey", ls=":", lw=1)
    ax_any.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax_any.set(
        xlabel="encoder iterations k (k > T repeats the last layer)",
        ylabel="test error (exact digit set)",
        title="Anytime inference",
        ylim=(0, 1.02),
    )
    ax_any.legend(fontsize=8)
    ax_res.set(
        xlabel="iterations", ylabel="median ||R(z) - z|| / ||z||", title="Fixed-point residual of the last layer"
    )
    ax_res.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
