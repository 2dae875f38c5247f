"""Why does a spectrally normalised network keep moving under extra iterations? Per stage of a trained run:

- the Lipschitz bounds the network used (c_t = max(L^_t / mu, 1) from its stored power vectors), and the
  bound of each corrected residual function f~_t = f_t / c_t recomputed with converged power iterations in
  operator mode (the true operator norms of the convolutions): L(f~_t) <= L^op_t / c_t;
- along K extra applications of the last block (on test images): the relative step ||z_{k+1} - z_k|| / ||z_k||,
  the ratio of successive steps ||z_{k+1} - z_k|| / ||z_k - z_{k-1}|| (the contraction actually seen; a PCR with
  L(f~) < 1 must show < 1), the empirical Lipschitz ratio of f~ along the path (steps under 1e-4 of ||z||,
  float32 noise after convergence, left out of both), and how far z moves from the
  trained read-out point z_T in total (||z_{T+K} - z_T|| / ||z_T||).

    python examples/di_diagnostics.py RUN_DIR [RUN_DIR ...] [--examples 500] [--extra 16] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from itconv_fast.data import datasets
from itconv_fast.experiments.config import TrainConfig
from itconv_fast.io.checkpoint import load_checkpoint_state
from itconv_fast.models import load_checkpoint
from itconv_fast.models.stage_spectral_norm import StageSpectralNorm
from itconv_fast.ops import init_power_vector


def _norms(t):
    return t.flatten(1).norm(dim=1)


@torch.no_grad()
def diagnose(run: str, examples: int, extra: int) -> dict:
    config = TrainConfig(**load_checkpoint_state(run, required=("config",))["config"])
    model = load_checkpoint(run)
    task = datasets.load(
        config.dataset,
        data_dir=config.data_dir,
        n_digits=config.n_digits,
        train_size=config.train_size,
        test_size=config.test_size,
        seed=config.seed,
        cache_dir=config.cache_dir or datasets.default_cache_dir(),
    )
    x, _ = next(iter(datasets.batches(task, task.test, examples, train=False)))
    out = {
        "run": run,
        "pcr": config.pcr,
        "sn_mu": config.sn_mu,
        "sn_mode": config.sn_mode,
        "blocks": config.blocks,
        "lam": config.lam,
        "stages": [],
    }
    z = model.stem(x)
    for s, stage in enumerate(model.stages):
        if s > 0:
            z = model.transitions[s - 1](z)
        x_s = z
        info = {}
        if stage.sn is not None:
            c = stage.corrections()
            conv1, conv2, d1, d2 = stage.spectral_weights()
            exact = StageSpectralNorm(len(stage.blocks), conv1.shape[1], stage.sn.input_size, stage.sn.mu, "operator")
            exact.u1.copy_(init_power_vector(conv1, "operator", stage.sn.input_size))
            exact.u2.copy_(init_power_vector(conv1, "operator", stage.sn.input_size))
            l_op = exact.bounds(conv1, conv2, d1, d2, n_iter=300, update=True)
            info.update(corrections=c.tolist(), operator_bound_of_corrected_f=(l_op / c).tolist())
        zs = [x_s]
        for block in stage.blocks:
            zs.append((x_s if stage.pcr else zs[-1]) + block.residual(zs[-1]))
        last = stage.blocks[-1]
        for _ in range(extra):
            zs.append((x_s if stage.pcr else zs[-1]) + last.residual(zs[-1]))
        T = len(stage.blocks)
        steps = [_norms(zs[k + 1] - zs[k]) for k in range(T, T + extra)]
        rel = [float((st / _norms(zs[k]).clamp_min(1e-12)).median()) for st, k in zip(steps, range(T, T + extra))]
        # Ratios of successive steps, while the steps are above float32 noise (1e-4 of |z|).
        ratios = [
            float((b / a.clamp_min(1e-12)).median())
            for a, b, k in zip(steps, steps[1:], range(T, T + extra))
            if float((a / _norms(zs[k])).median()) > 1e-4
        ]
        lips = []
        for k in range(T, T + extra - 1):
            dz = _norms(zs[k + 1] - zs[k])
            # Steps below 1e-4 of |z| are float32 rounding noise once a PCR has converged: left out.
            ok = dz > 1e-4 * _norms(zs[k])
            if ok.any():
                df = _norms(last.residual(zs[k + 1]) - last.residual(zs[k]))
                lips.append(float((df[ok] / dz[ok]).max()))
        info.update(
            relative_step_median=rel,
            successive_step_ratio_median=ratios,
            empirical_lipschitz_max=max(lips) if lips else None,
            total_drift_median=float((_norms(zs[T + extra] - zs[T]) / _norms(zs[T])).median()),
        )
        out["stages"].append(info)
        z = zs[T]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--extra", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [diagnose(run, args.examples, args.extra) for run in args.runs]
    for r in results:
        kind = "PCR" if r["pcr"] else "ICR"
        print(f"{r['run']}: {kind}, mu {r['sn_mu']} ({r['sn_mode']}), T {r['blocks']}, lam {r['lam']}")
        for s, st in enumerate(r["stages"], start=1):
            bound = st.get("operator_bound_of_corrected_f")
            b = f"max L(f~) <= {max(bound):.3f}" if bound else "no SN"
            ratios = st["successive_step_ratio_median"]
            ratio = f"{statistics.median(ratios):.3f}" if ratios else "n/a"
            lip = "n/a" if st["empirical_lipschitz_max"] is None else f"{st['empirical_lipschitz_max']:.3f}"
            print(
                f"  stage {s}: {b}; step/|z| k=1: {st['relative_step_median'][0]:.3g}, "
                f"k={len(st['relative_step_median'])}: "
                f"{st['relative_step_median'][-1]:.3g}; step ratio median {ratio}; "
                f"empirical Lip(f~) max {lip}; drift |z_T+K - z_T|/|z_T| {st['total_drift_median']:.3f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
