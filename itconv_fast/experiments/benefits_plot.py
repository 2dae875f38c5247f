"""The figures of a run's benefits (`benefits_of_run`'s result): one per measure (matplotlib, imported when
drawn).

    paths = plot_benefits(result, "runs/x/benefits.png")   # runs/x/benefits-thinking-longer.png, ...
"""

from __future__ import annotations

import os

__all__ = ["plot_benefits", "benefit_plot_paths"]

_FIGURES = (("thinking_longer", "thinking-longer"), ("adaptive_depth", "adaptive-depth"), ("robustness", "robustness"))


def benefit_plot_paths(result: dict, path: str) -> dict:
    """{measure key: the PNG it is drawn to}: path's stem with the measure's name appended."""
    stem, _ = os.path.splitext(path)
    return {key: f"{stem}-{name}.png" for key, name in _FIGURES if key in result}


def _thinking_longer(ax, result) -> None:
    for name, r in result["thinking_longer"].items():
        ax.plot(range(len(r["errors"])), r["errors"], "o-", ms=3, label=f"{name} (gain {r['gain']:.3f})")
    ax.set_xlabel("extra iterations k of every stage")
    ax.set_ylabel("error")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("thinking longer")
    ax.legend(fontsize=7)


def _adaptive_depth(ax, result) -> None:
    r = result["adaptive_depth"]
    full = r["full_flops"]
    for curve in r["curves"]:
        saved = r["compute_saved_by_rule"][curve["rule"]]
        xs = [f / full for f in curve["mean_flops"]]
        ax.plot(xs, curve["errors"], "o-", ms=3, label=f"{curve['rule']} (saves {saved:.0%})")
        for x, e, level in zip(xs, curve["errors"], curve["levels"]):
            ax.annotate(f"{level:g}", (x, e), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.plot([1.0], [r["full_error"]], "k*", ms=9, label="full network")
    ax.axhline(r["full_error"] + r["error_margin"], color="k", ls=":", lw=1, label="equal error (+0.5 pt)")
    ax.set_xlabel("FLOPs / full network's")
    ax.set_ylabel("error")
    ax.set_title("adaptive depth")
    ax.legend(fontsize=7)


def _robustness(ax, result) -> None:
    r = result["robustness"]
    ax.plot(r["sigmas"], r["noise_errors"], "o-", ms=3, label="Gaussian noise (x: sigma)")
    ax.plot(r["epsilons"], r["pgd_errors"], "s-", ms=3, label=f"PGD, {r['pgd_steps']} steps (x: L-inf eps)")
    if r.get("certified_shares") is not None:
        ax.plot(r["epsilons"], [1 - c for c in r["certified_shares"]], "^--", ms=3, label="not certified right")
    ax.axhline(r["clean_error"], color="k", ls=":", lw=1, label="clean error")
    ax.set_xscale("symlog", linthresh=min([v for v in r["sigmas"] + r["epsilons"] if v > 0], default=0.01))
    ax.set_xlabel("perturbation size (input units)")
    ax.set_ylabel("error")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("robustness")
    ax.legend(fontsize=7)


def plot_benefits(result: dict, path: str) -> list:
    """Draws one PNG per measure in `result` (benefit_plot_paths) and returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    draw = {"thinking_longer": _thinking_longer, "adaptive_depth": _adaptive_depth, "robustness": _robustness}
    written = []
    for key, out in benefit_plot_paths(result, path).items():
        fig, ax = plt.subplots(figsize=(5.5, 4))
        draw[key](ax, result)
        fig.suptitle(os.path.basename(result.get("run", "")), fontsize=9)
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(out)
    return written
