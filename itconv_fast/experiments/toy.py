"""The toy inverse problem of the paper's Fig 1 (SPEC section 6).

Invert f(z) = (a1 z1, a2 z2), a = (3/2, 3/4), from x = f(z). Three solvers of T steps each:
- the error-corrective iteration z^(t+1)_i = z^(t)_i - s_i eps_i (a_i z^(t)_i - x_i), s_i = sign(a_i),
  eps = (0.3, 0.8), from z^(0) = x: a contraction (factors |1 - eps_i a_i| = 0.55, 0.4), so it converges to
  f^-1(x) and extra steps do no harm;
- a small trained ResNet: encoder h_0 = E x, blocks h_t = h_{t-1} + W2_t relu(W1_t h_{t-1} + b1_t) + b2_t,
  linear read-out D h_t;
- a trained recurrent ResNet: the same with one block shared by every step.

Each is probed as the paper probes its networks: the read-out trajectory across blocks (early read-out),
dropping one block, and applying the last block k more times. `run_toy(out_dir)` trains both networks
(seeded, a few seconds on a CPU), writes toy.json (every curve, and the facts checked by the tests) and
toy.png (like Fig 1b-d).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ToyConfig", "ToyResNet", "error_corrective", "run_toy", "plot_toy"]

A = (1.5, 0.75)
EPS = (0.3, 0.8)


@dataclass
class ToyConfig:
    blocks: int = 4  # T
    hidden: int = 16  # units in a block's hidden layer
    state: int = 8  # width of the residual stream h
    steps: int = 1500  # Adam steps
    batch: int = 256
    lr: float = 3e-3
    extra_iterations: int = 16  # K
    seed: int = 0
    example: tuple = (0.8, -0.6)  # the latent z of the plotted example


def _forward_model(z: torch.Tensor) -> torch.Tensor:
    return z * torch.tensor(A, dtype=z.dtype)


def error_corrective(x: torch.Tensor, steps: int) -> list:
    """The error-corrective iteration from z^(0) = x: [z^(0), ..., z^(steps)]."""
    a, eps = torch.tensor(A, dtype=x.dtype), torch.tensor(EPS, dtype=x.dtype)
    z, out = x.clone(), [x.clone()]
    for _ in range(steps):
        z = z - torch.sign(a) * eps * (a * z - x)
        out.append(z)
    return out


class ToyResNet(nn.Module):
    """Encoder, T residual MLP blocks (shared if recurrent), linear read-out."""

    def __init__(self, blocks: int, state: int, hidden: int, recurrent: bool) -> None:
        super().__init__()
        self.recurrent = recurrent
        self.encoder = nn.Linear(2, state)
        n = 1 if recurrent else blocks
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(state, hidden), nn.ReLU(), nn.Linear(hidden, state)) for _ in range(n)
        )
        self.T = blocks
        self.readout = nn.Linear(state, 2)

    def block(self, t: int) -> nn.Module:
        return self.layers[0 if self.recurrent else t]

    def states(self, x: torch.Tensor, *, drop: int = None, extra: int = 0) -> list:
        """[h_0, ..., h_T(, h_T+1, ..., h_T+extra)]; drop = t (1-based) skips block t (h_t = h_{t-1})."""
        h = self.encoder(x)
        out = [h]
        for t in range(self.T):
            if drop != t + 1:
                h = h + self.block(t)(h)
            out.append(h)
        last = self.block(self.T - 1)
        for _ in range(extra):
            h = h + last(h)
            out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.states(x)[-1])


def _sample(n: int, generator: torch.Generator):
    z = torch.rand(n, 2, generator=generator) * 2 - 1
    return _forward_model(z), z


def _train(recurrent: bool, config: ToyConfig) -> ToyResNet:
    torch.manual_seed(config.seed + (1000 if recurrent else 0))
    g = torch.Generator().manual_seed(config.seed)
    model = ToyResNet(config.blocks, config.state, config.hidden, recurrent)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    for _ in range(config.steps):
        x, z = _sample(config.batch, g)
        loss = nn.functional.mse_loss(model(x), z)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def _mse(pred: torch.Tensor, z: torch.Tensor) -> float:
    return float(((pred - z) ** 2).sum(dim=1).mean())


@torch.no_grad()
def _probe_network(model: ToyResNet, x, z, example_x, K: int) -> dict:
    T = model.T
    states = model.states(x, extra=K)
    readouts = [model.readout(h) for h in states]
    ex = [model.readout(h)[0].tolist() for h in model.states(example_x, extra=K)]
    drops = [_mse(model.readout(model.states(x, drop=t)[-1]), z) for t in range(1, T + 1)]
    ex_drop = {t: [model.readout(h)[0].tolist() for h in model.states(example_x, drop=t)] for t in range(1, T + 1)}
    return {
        "readout_error": [_mse(r, z) for r in readouts[: T + 1]],  # after block t = 0..T
        "dropout_error": drops,  # block t = 1..T dropped
        "extra_error": [_mse(r, z) for r in readouts[T + 1 :]],  # k = 1..K extra applications of block T
        "example_trajectory": ex[: T + 1],
        "example_extra": ex[T:],
        "example_dropout": {str(t): v for t, v in ex_drop.items()},
    }


@torch.no_grad()
def _probe_algorithm(x, z, example_x, T: int, K: int) -> dict:
    traj = error_corrective(x, T + K)
    ex = [v[0].tolist() for v in error_corrective(example_x, T + K)]
    drops = [_mse(error_corrective(x, T - 1)[-1], z) for _ in range(T)]  # every step is the same map
    ex_drop = [v[0].tolist() for v in error_corrective(example_x, T - 1)]
    return {
        "readout_error": [_mse(v, z) for v in traj[: T + 1]],
        "dropout_error": drops,
        "extra_error": [_mse(v, z) for v in traj[T + 1 :]],
        "example_trajectory": ex[: T + 1],
        "example_extra": ex[T:],
        "example_dropout": {str(t): ex_drop[:t] + ex_drop[t - 1 :] for t in range(1, T + 1)},
    }


def run_toy(out_dir: str, config: ToyConfig = ToyConfig(), plot: bool = True) -> dict:
    """Trains both networks, probes the three solvers on 4,096 test inputs, writes toy.json (and toy.png)."""
    from ..io.checkpoint import atomic_write_json

    os.makedirs(out_dir, exist_ok=True)
    test_x, test_z = _sample(4096, torch.Generator().manual_seed(config.seed + 1))
    example_z = torch.tensor([config.example], dtype=torch.float32)
    example_x = _forward_model(example_z)
    T, K = config.blocks, config.extra_iterations
    results = {"algorithm": _probe_algorithm(test_x, test_z, example_x, T, K)}
    for name, recurrent in (("resnet", False), ("recurrent_resnet", True)):
        results[name] = _probe_network(_train(recurrent, config), test_x, test_z, example_x, K)
    facts = {}
    for name, r in results.items():
        final, last_extra = r["readout_error"][-1], r["extra_error"][-1]
        facts[name] = {
            "final_error": final,
            "error_after_K_extra": last_extra,
            "extra_over_final": last_extra / max(final, 1e-12),
            "extra_error_nonincreasing": all(
                b <= a * (1 + 1e-6) + 1e-12 for a, b in zip(r["extra_error"], r["extra_error"][1:])
            ),
        }
    report = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
        "forward_model": {"a": list(A), "eps": list(EPS)},
        "example_latent": list(config.example),
        "results": results,
        "facts": facts,
    }
    atomic_write_json(os.path.join(out_dir, "toy.json"), report)
    if plot:
        plot_toy(report, os.path.join(out_dir, "toy.png"))
    return report


def plot_toy(report: dict, path: str) -> None:
    """Fig 1b-d: trajectories of the estimate across blocks, block drop-out, extra iterations; and the mean
    squared error of each probe on the test inputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {
        "algorithm": "error-corrective iteration",
        "resnet": "trained ResNet",
        "recurrent_resnet": "trained recurrent ResNet",
    }
    colors = {"algorithm": "C2", "resnet": "C0", "recurrent_resnet": "C1"}
    target = report["example_latent"]
    res = report["results"]
    T = report["config"]["blocks"]
    drop = max(1, T // 2)
    fig, axes = plt.subplots(2, 3, figsize=(13, 8))
    titles = [
        "b: read-out after each block",
        f"c: block {drop} dropped (solid) vs intact (faint)",
        "d: last block applied again (dashed)",
    ]
    for j, ax in enumerate(axes[0]):
        for name, r in res.items():
            c = colors[name]
            if j == 0:
                tr = r["example_trajectory"]
                ax.plot([p[0] for p in tr], [p[1] for p in tr], "-o", ms=3, color=c, label=names[name])
            elif j == 1:
                tr, dr = r["example_trajectory"], r["example_dropout"][str(drop)]
                ax.plot([p[0] for p in tr], [p[1] for p in tr], "-", color=c, alpha=0.3)
                ax.plot([p[0] for p in dr], [p[1] for p in dr], "-o", ms=3, color=c, label=names[name])
            else:
                tr, ex = r["example_trajectory"], r["example_extra"]
                ax.plot([p[0] for p in tr], [p[1] for p in tr], "-", color=c, alpha=0.5)
                ax.plot([p[0] for p in ex], [p[1] for p in ex], "--.", ms=3, color=c, label=names[name])
        ax.plot([target[0]], [target[1]], "kx", ms=12, mew=2.5, label="true z")
        ax.set_title(titles[j], fontsize=10)
        ax.set_xlabel("estimate of z1")
        ax.set_ylabel("estimate of z2")
    axes[0, 0].legend(fontsize=8)
    low = [
        ("readout_error", "early read-out: error after block t", "block t", range(0, T + 1)),
        ("dropout_error", "block drop-out: error with block t dropped", "dropped block t", range(1, T + 1)),
        ("extra_error", "extra iterations: error after T + k steps", "extra iterations k", None),
    ]
    for ax, (key, title, xlabel, xs) in zip(axes[1], low):
        for name, r in res.items():
            ys = r[key]
            ax.plot(
                list(xs) if xs is not None else list(range(1, len(ys) + 1)),
                ys,
                "-o",
                ms=3,
                color=colors[name],
                label=names[name],
            )
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean squared error on 4,096 test inputs")
    fig.suptitle(
        "Toy inverse problem x = (1.5 z1, 0.75 z2) (paper Fig 1): "
        f"T = {T} steps; the iteration converges, the trained networks overshoot",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
