"""Gram bound / operator norm on the block kernels of a trained run (default: runs/ quick preset).

    python benchmarks/gram_tightness_trained.py RUN_DIR [OUT.json]

"Exact" is operator-mode power iteration run to convergence (3,000 steps) on the stage's feature-map size.
"""

import json
import sys

from itconv_fast import ops
from itconv_fast.models import load_checkpoint
from itconv_fast.models.stage_spectral_norm import fold_batchnorm


def main(run, out=None):
    model = load_checkpoint(run)
    side0 = model.config["input_size"]
    report = {"run": run, "ratios (min, mean, max)": {}}
    for s, stage in enumerate(model.stages):
        side = side0 // 2**s
        conv1, conv2, d1, d2 = stage.spectral_weights()
        for name, w in (("conv2", conv2), ("bn-folded conv1", fold_batchnorm(conv1, d1, d2))):
            w = w.detach().double()
            u = ops.init_power_vector(w, "operator", (side, side))
            exact = ops.batched_spectral_norm(w, u, mode="operator", n_iter=3000, input_size=(side, side))
            for steps in (4, 6):
                r = ops.gram_spectral_bound(w, steps) / exact
                key = f"stage {s + 1} ({side}x{side}) {name}, {steps} steps"
                report["ratios (min, mean, max)"][key] = [
                    round(r.min().item(), 3),
                    round(r.mean().item(), 3),
                    round(r.max().item(), 3),
                ]
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
