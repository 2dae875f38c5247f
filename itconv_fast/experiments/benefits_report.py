"""The benefits section of a sweep report (trials measured with `indices: benefits: [...]`): a table per variant
and training-set size, the correlations of each benefit with DI and RI across trials, and four figures:

- gain-di: the gain from thinking longer on each harder test set against DI;
- saved-di: adaptive depth's compute saved at equal error against DI;
- robust-di: the error under Gaussian noise and under PGD against DI;
- error-size: the test error against the training-set size (data efficiency).

One point per variant (mean ± sd over seeds, the seeds as faint dots); filled markers at the largest training set,
hollow ones at the smaller sets.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict

from .variants import family_style, mean_sd, pyplot, save_figure, variant_of

__all__ = ["has_benefits", "benefits_section", "correlation", "benefit_metrics"]


def has_benefits(rows: list) -> bool:
    return any(k.startswith(("tl_", "ad_compute_saved", "pgd_error_")) for k in rows[0])


def _pick(rows, prefix: str, wanted: float):
    """The column prefix<value> closest to `wanted` among those the rows have (None if none)."""
    values = [float(k[len(prefix) :]) for k in rows[0] if k.startswith(prefix)]
    if not values:
        return None
    return f"{prefix}{min(values, key=lambda v: abs(math.log(v / wanted)) if v > 0 else math.inf):g}"


def benefit_metrics(rows: list, sigma: float = 0.5, eps: float = 0.03) -> list:
    """[(column, short name, lower is better)] of the benefits the rows hold: the gain on every harder test set
    (not the training distribution's own), the compute saved, the noise error near sigma, the PGD error and the
    certified share near eps."""
    out = []
    harder = [k for k in rows[0] if k.startswith("tl_") and k.endswith("_gain") and not k.startswith("tl_test_set")]
    out += [(k, "gain " + k[3:-5].replace("digitclutter-", "DC-").replace("_", " "), False) for k in harder]
    if "tl_test_set_gain" in rows[0]:
        out.append(("tl_test_set_gain", "gain test set", False))
    if "ad_compute_saved" in rows[0]:
        out.append(("ad_compute_saved", "compute saved", False))
    for prefix, name, lower in (
        ("noise_error_sigma", "noise err σ", True),
        ("pgd_error_eps", "PGD err ε", True),
        ("certified_eps", "certified ε", False),
    ):
        column = _pick(rows, prefix, sigma if prefix.startswith("noise") else eps)
        if column and any(r.get(column) is not None for r in rows):
            out.append((column, f"{name} {column[len(prefix) :]}", lower))
    return out


def correlation(xs, ys, resamples: int = 2000, seed: int = 0) -> tuple:
    """(Pearson r, 2.5th and 97.5th percentiles of r over bootstrap resamples of the pairs, n); NaN where
    undefined (fewer than 3 pairs, or no spread)."""
    import numpy as np

    pairs = np.array(
        [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None and not (math.isnan(x) or math.isnan(y))]
    )
    nan = float("nan")
    if len(pairs) < 3 or pairs[:, 0].std() == 0 or pairs[:, 1].std() == 0:
        return nan, nan, nan, len(pairs)
    r = float(np.corrcoef(pairs.T)[0, 1])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        sample = pairs[rng.integers(0, len(pairs), len(pairs))]
        if sample[:, 0].std() > 0 and sample[:, 1].std() > 0:
            draws.append(np.corrcoef(sample.T)[0, 1])
    lo, hi = np.percentile(draws, [2.5, 97.5]) if draws else (nan, nan)
    return r, float(lo), float(hi), len(pairs)


def _groups(rows) -> "OrderedDict":
    """{(family, label, train_size): rows} in the order they first appear."""
    groups = OrderedDict()
    for r in rows:
        family, label = variant_of(r)
        groups.setdefault((family, label, r.get("train_size")), []).append(r)
    return groups


def _against(ax, rows, x_key: str, y_key: str, sizes: list) -> None:
    for (family, label, size), rs in _groups(rows).items():
        color, marker = family_style(family)
        face = color if size == sizes[-1] else "none"
        ax.scatter([r[x_key] for r in rs], [r[y_key] for r in rs], color=color, marker=marker, s=12, alpha=0.3)
        (mx, sx, _), (my, sy, _) = mean_sd([r[x_key] for r in rs]), mean_sd([r[y_key] for r in rs])
        tag = f" (n={len(rs)})" if size == sizes[-1] else ""
        ax.errorbar(
            [mx], [my], xerr=[sx], yerr=[sy], color=color, marker=marker, mfc=face, mec=color, ms=7, capsize=2,
            label=label + tag if size == sizes[-1] else None,
        )  # fmt: skip


def _figure(path: str, panels: list, rows, sizes, title: str) -> bool:
    """panels: [(x column, y column, y label)], three to a row; False (nothing drawn) when no panel has data."""
    panels = [p for p in panels if any(r.get(p[1]) is not None for r in rows)]
    if not panels:
        return False
    plt = pyplot()
    columns = min(3, len(panels))
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.6 * columns + 2.6, 4.2 * lines), squeeze=False)
    for ax, (x_key, y_key, y_label) in zip(axes.flat, panels):
        _against(ax, [r for r in rows if r.get(y_key) is not None], x_key, y_key, sizes)
        ax.set_xlabel("Divergence Index" if x_key == "di" else x_key)
        ax.set_ylabel(y_label)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title + f"\n(filled: train size {sizes[-1]}; hollow: {', '.join(map(str, sizes[:-1])) or '-'})",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def _error_against_size(path: str, rows, sizes) -> bool:
    if len(sizes) < 2:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    by_variant = OrderedDict()
    for (family, label, size), rs in _groups(rows).items():
        by_variant.setdefault((family, label), {})[size] = rs
    for (family, label), per_size in by_variant.items():
        color, marker = family_style(family)
        xs = sorted(per_size)
        stats = [mean_sd([r["final_test_error"] for r in per_size[s]]) for s in xs]
        ax.errorbar(xs, [m for m, _, _ in stats], yerr=[sd for _, sd, _ in stats], color=color, marker=marker,
                    capsize=2, label=label)  # fmt: skip
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.xaxis.set_minor_formatter(NullFormatter())  # only the sizes trained on are labelled
    ax.set_xlabel("training-set size")
    ax.set_ylabel("final test error")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("Data efficiency: test error against training-set size (mean ± sd over seeds)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def _fmt(mean, sd, digits=3) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def benefits_section(rows: list, folder: str, stem: str) -> list:
    """The markdown lines of the benefits section; its figures are written to folder/stem-benefits-*.png."""
    metrics = benefit_metrics(rows)
    sizes = sorted({r.get("train_size") for r in rows if r.get("train_size") is not None}) or [None]
    lines = [
        "## Benefits",
        "",
        "Per variant and training-set size, mean ± sd over seeds. Gains: the error at k = 0 minus the lowest error "
        "over k = 0..K extra iterations of every stage, on each harder test set (DC-n: Digitclutter with n digits); "
        "heldout: with k chosen on the other half of the examples (not biased upwards by the choice; can be < 0). "
        "Compute saved: adaptive depth's, at no more than 0.5 points of error above the full network, the best "
        "halting rule. Noise and PGD: errors under Gaussian noise and an L-infinity attack of the size shown "
        "(input units); certified: the share certified right at that size (spectrally normalised networks' bound).",
        "",
        "| variant | train size | n | error | CI | RI | DI | " + " | ".join(name for _, name, _ in metrics) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(metrics),
    ]
    for (_, label, size), rs in _groups(rows).items():
        cells = [_fmt(*mean_sd([r[k] for r in rs])[:2], 4 if k == "final_test_error" else 3)
                 for k in ("final_test_error", "ci", "ri", "di")]  # fmt: skip
        cells += [_fmt(*mean_sd([r.get(k) for r in rs])[:2]) for k, _, _ in metrics]
        lines.append(f"| {label} | {size} | {len(rs)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Does convergence (low DI) or iteration (high RI) go with the benefit? Pearson r across trials (every "
        "variant and seed at each training-set size), with the 95% bootstrap interval of r over resampled trials:",
        "",
        "| benefit | train size | n | r with DI | r with RI |",
        "|---|---|---|---|---|",
    ]
    for column, name, _ in metrics:
        for size in sizes:
            at = [r for r in rows if r.get("train_size") == size]
            cells = []
            for index in ("di", "ri"):
                r, lo, hi, n = correlation([t[index] for t in at], [t.get(column) for t in at])
                cells.append("n/a" if math.isnan(r) else f"{r:+.2f} [{lo:+.2f}, {hi:+.2f}]")
            lines.append(f"| {name} | {size} | {n} | " + " | ".join(cells) + " |")
    gains = [(k, "gain " + n[5:]) for k, n, _ in metrics if k.startswith("tl_") and not k.startswith("tl_test_set")]
    robust = [(k, n) for k, n, _ in metrics if k.startswith(("noise_error", "pgd_error"))]
    figures = [
        ("gain-di", "Gain from thinking longer against DI", [("di", k, n) for k, n in gains]),
        ("saved-di", "Adaptive depth: compute saved at equal error against DI",
         [("di", "ad_compute_saved", "compute saved")]),
        ("robust-di", "Robust error against DI", [("di", k, n) for k, n in robust]),
    ]  # fmt: skip
    lines += ["", "### Benefit figures", ""]
    for name, title, panels in figures:
        path = os.path.join(folder, f"{stem}-benefits-{name}.png")
        if _figure(path, panels, rows, sizes, title):
            lines += [f"![{title}]({os.path.basename(path)})", ""]
    path = os.path.join(folder, f"{stem}-benefits-error-size.png")
    if _error_against_size(path, rows, sizes):
        lines += [f"![Test error against training-set size]({os.path.basename(path)})", ""]
    return lines
