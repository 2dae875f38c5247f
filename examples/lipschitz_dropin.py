"""Drop-in Lipschitz control on a model that is not ours: a small VGG-style CNN for 32x32 images.

    python examples/lipschitz_dropin.py                 # tables before / after, docs/lipschitz/report.md
    itconv-fast lipschitz examples/lipschitz_dropin.py  # the report of the untouched model

The model mixes what torch's reshaped-kernel spectral_norm gets wrong: 3x3 convolutions (whose operator
norm is up to 3x the reshaped kernel's), a circular-padded one (exact norm by FFT), strided ones, a
grouped one. BatchedSpectralNorm(mu=1, mode="operator") bounds every layer's true norm on its input size
by 1 (soft: layers already below are left alone) with one batched power-step call per shape group.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from itconv_fast import lipschitz_report
from itconv_fast.nn import BatchedSpectralNorm


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, padding_mode="circular"),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def example_input() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def main(out_dir: str = os.path.join("docs", "lipschitz")) -> tuple:
    model, x = build_model(), example_input()
    before = lipschitz_report(model, x, power_iterations=200)
    sn = BatchedSpectralNorm(model, mu=1.0, mode="operator", example_input=x, init_iterations=200)
    model.eval()
    after = lipschitz_report(model, x, power_iterations=200)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("## Before (plain model)\n\n" + before.to_markdown() + "\n\n")
        f.write("## After BatchedSpectralNorm(mu=1.0, mode='operator')\n\n" + after.to_markdown() + "\n\n")
        f.write(f"Groups of the batched calls: {sn.groups}\n")
    print("before:\n" + before.table() + "\n\nafter BatchedSpectralNorm(mu=1, operator):\n" + after.table())
    print(f"groups: {sn.groups}")
    return before, after


if __name__ == "__main__":
    main()
