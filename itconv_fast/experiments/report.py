"""A markdown report with the paper's figures, drawn from a sweep's results.csv.

    itconv-fast report DIR [--out DIR/report.md]

Trials are grouped by every configuration column that varies in the sweep except the seed; each group
shows the mean and the standard deviation over its seeds (n = number of seeds). Figures (PNG beside the
report), drawn like the paper's:
- fig2b.png: indices per stage of the ordinary networks (lam = 0, non-recurrent, no spectral
  normalization): one small dot per network, a large dot for the mean (Fig 2b);
- fig3a.png / fig3b.png: CI, RI, DI and the test error against lam, one line per width and
  initialisation (Fig 3a, 3b), networks without spectral normalization;
- fig3c.png: test error against CI and DI, one colour per width (Fig 3c);
- fig4a.png: indices of the spectrally normalised networks, ICR and PCR side by side (Fig 4a, S2 Fig).

The report and the figures it embeds are one cohesive thing (they share the grouping, the labels and the
variant styles); past 400 lines only since the formatter lays calls out one argument a line.
"""

from __future__ import annotations

import csv
import math
import os
from collections import OrderedDict

from .benefits_report import benefits_section, has_benefits
from .variants import family_style, mean_sd, objectives_of, pyplot, save_figure, variant_of

__all__ = ["read_results", "group_trials", "write_report"]

CONFIG_COLUMNS = (
    "dataset",
    "n_digits",
    "train_size",
    "test_size",
    "width",
    "blocks",
    "stages",
    "lam",
    "coupling_kernel",
    "coupling_bandwidth",
    "skip_first",
    "sn_mu",
    "sn_mode",
    "pcr",
    "init_resolved",
    "bn_gamma_init",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "preset",
    "objectives",
    "objective_k",
    "objective_rho",
)
METRICS = ("final_test_error", "ci", "ri", "di")


def _value(text: str):
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_results(sweep_dir: str) -> list:
    """The rows of DIR/results.csv with typed values (None for empty cells, NaN for undefined indices)."""
    path = os.path.join(sweep_dir, "results.csv") if os.path.isdir(sweep_dir) else sweep_dir
    if not os.path.exists(path):
        raise FileNotFoundError(f"no results.csv in {sweep_dir} (run itconv-fast sweep first)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"{path} holds no finished trials")
    for row in rows:
        for key in row:
            if key in METRICS or key.startswith(("ci_s", "ri_s", "di_s")):
                if row[key] is None:
                    row[key] = float("nan")
        row["init_resolved"] = (
            row["init"] if row["init"] != "auto" else ("recurrent" if row["lam"] > 0 else "nonrecurrent")
        )
        row["status"] = row.get("status") or "ok"  # results from before statuses existed
        for key, default in (("objectives", "none"), ("objective_k", 16), ("objective_rho", 0.9)):
            if row.get(key) is None:  # results from before objectives existed trained without any
                row[key] = default
    return rows


def _varying(rows: list) -> list:
    keys = [k for k in CONFIG_COLUMNS if k in rows[0]]
    return [k for k in keys if len({repr(r.get(k)) for r in rows}) > 1]


def group_trials(rows: list) -> "OrderedDict":
    """{(varying config values, seed excluded): [rows]} in the order the groups first appear."""
    keys = _varying(rows)
    groups = OrderedDict()
    for row in rows:
        groups.setdefault(tuple((k, row.get(k)) for k in keys), []).append(row)
    return groups


def _label(key: tuple) -> str:
    def fmt(v):
        return "none" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))

    return ", ".join(f"{'init' if k == 'init_resolved' else k}={fmt(v)}" for k, v in key) or "all trials"


def _stage_count(rows) -> int:
    s = 0
    while f"ci_s{s + 1}" in rows[0]:
        s += 1
    return s


def _fmt(mean, sd, digits=3):
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _is_plain(row) -> bool:
    """The paper's networks without spectral normalization and without extra objectives."""
    return row["sn_mu"] is None and not row["pcr"] and not objectives_of(row)


def _fig2b(rows, path) -> bool:
    sel = [r for r in rows if _is_plain(r) and r["lam"] == 0 and r["init_resolved"] == "nonrecurrent"]
    if not sel:
        return False
    plt = pyplot()
    S = _stage_count(sel)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2), sharey=True)
    for ax, name in zip(axes, ("ci", "ri", "di")):
        for s in range(1, S + 1):
            vals = [r[f"{name}_s{s}"] for r in sel]
            ax.scatter([s] * len(vals), vals, s=18, alpha=0.35, color="C0")
            mean, _, _ = mean_sd(vals)
            ax.scatter([s], [mean], s=90, color="C0", edgecolor="k", zorder=3)
        ax.set_xticks(range(1, S + 1))
        ax.set_xlabel("stage")
        ax.set_title({"ci": "Convergence Index", "ri": "Recurrence Index", "di": "Divergence Index"}[name], fontsize=10)
        ax.set_ylim(-0.05, 1.05)
    axes[0].set_ylabel("index")
    fig.suptitle(f"Fig 2b: ordinary networks (lam = 0, non-recurrent, no SN), {len(sel)} networks", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def _lines_against_lam(rows, metrics, titles, path, suptitle) -> bool:
    sel = [r for r in rows if _is_plain(r)]
    if len({r["lam"] for r in sel}) < 2:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.3), squeeze=False)
    widths = sorted({r["width"] for r in sel})
    for ax, metric, title in zip(axes[0], metrics, titles):
        for i, w in enumerate(widths):
            for init, style in (("recurrent", "-o"), ("nonrecurrent", "--s")):
                pts = {}
                for r in sel:
                    if r["width"] == w and r["init_resolved"] == init:
                        pts.setdefault(r["lam"], []).append(r[metric])
                if not pts:
                    continue
                lams = sorted(pts)
                stats = [mean_sd(pts[lam]) for lam in lams]
                ax.errorbar(
                    lams,
                    [m for m, _, _ in stats],
                    yerr=[sd for _, sd, _ in stats],
                    fmt=style,
                    ms=5,
                    capsize=3,
                    color=f"C{i}",
                    label=f"width {w}, {'rec.' if init == 'recurrent' else 'non-rec.'}",
                )
        ax.set_xlabel("coupling lam")
        ax.set_title(title, fontsize=10)
        if metric != "final_test_error":
            ax.set_ylim(-0.05, 1.05)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def _fig3c(rows, path) -> bool:
    sel = [r for r in rows if _is_plain(r)]
    if len(sel) < 2:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.3), sharey=True)
    widths = sorted({r["width"] for r in sel})
    for ax, metric, name in zip(axes, ("ci", "di"), ("Convergence Index", "Divergence Index")):
        for i, w in enumerate(widths):
            pts = [(r[metric], r["final_test_error"]) for r in sel if r["width"] == w]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", s=22, label=f"width {w}")
        ax.set_xlabel(name)
        ax.set_xlim(-0.05, 1.05)
    axes[0].set_ylabel("test error")
    axes[0].legend(fontsize=8)
    fig.suptitle("Fig 3c: test error against CI and DI (networks without SN; one dot per network)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def _fig4a(rows, path) -> bool:
    sel = [r for r in rows if r["sn_mu"] is not None]
    if not sel:
        return False
    plt = pyplot()
    groups = group_trials(sel)
    labels = [
        _label(tuple((k, v) for k, v in key if k in ("pcr", "sn_mu", "sn_mode", "blocks", "lam", "width")))
        .replace("pcr=True", "PCR")
        .replace("pcr=False", "ICR")
        for key in groups
    ]
    fig, axes = plt.subplots(1, 4, figsize=(15, 0.45 * len(groups) + 2.2), sharey=True)
    for ax, metric, title in zip(axes, ("ci", "ri", "di", "final_test_error"), ("CI", "RI", "DI", "test error")):
        for y, rs in enumerate(groups.values()):
            vals = [r[metric] for r in rs]
            ax.scatter(vals, [y] * len(vals), s=18, alpha=0.4, color="C3" if rs[0]["pcr"] else "C0")
            mean, _, _ = mean_sd(vals)
            ax.scatter([mean], [y], s=80, color="C3" if rs[0]["pcr"] else "C0", edgecolor="k", zorder=3)
        ax.set_title(title, fontsize=10)
        if metric != "final_test_error":
            ax.set_xlim(-0.05, 1.05)
    axes[0].set_yticks(range(len(groups)))
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(
        "Fig 4a / S2 Fig: spectrally normalised networks (blue ICR, red PCR; large dot: mean over seeds)", fontsize=10
    )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def _fig_error_against_di(rows, path, threshold: float = 0.15) -> bool:
    """The title question on one figure: test error against DI, one point per variant (mean ± sd over seeds, the
    seeds as faint dots), the ordinary network, the paper's two objectives and the new ones on the same axes."""
    if not any(objectives_of(r) for r in rows):
        return False
    plt = pyplot()
    variants = OrderedDict()
    for r in rows:
        variants.setdefault(variant_of(r), []).append(r)
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    members = OrderedDict()  # family -> its variants in order: a family's later variants (larger weights) draw larger
    for family, label in variants:
        members.setdefault(family, []).append(label)
    for (family, label), rs in variants.items():
        color, marker = family_style(family)
        rank, count = members[family].index(label), len(members[family])
        size = 8 if count == 1 else 6 + 5 * rank / (count - 1)
        ax.scatter(
            [r["di"] for r in rs], [r["final_test_error"] for r in rs], color=color, marker=marker, s=14, alpha=0.3
        )
        (dx, dsd, _), (ey, esd, _) = mean_sd([r["di"] for r in rs]), mean_sd([r["final_test_error"] for r in rs])
        ax.errorbar(
            [dx],
            [ey],
            xerr=[dsd],
            yerr=[esd],
            color=color,
            marker=marker,
            ms=size,
            mec="k",
            capsize=3,
            label=f"{label} (n={len(rs)})",
        )
    ax.axvline(threshold, color="0.6", ls="--", lw=1)
    ax.text(threshold, ax.get_ylim()[1], f" DI {threshold:g}", color="0.4", fontsize=8, va="top")
    ax.set_xlabel("Divergence Index (mean over stages; 0: extra iterations do no harm)")
    ax.set_ylabel("final test error")
    ax.set_xlim(-0.05, 1.05)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(
        "Do objectives that encourage convergence help? Test error against DI\n"
        "(mean ± sd over seeds; faint: single seeds; larger marker: larger weight; lower left is better)",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


SCALE_COLUMNS = (
    "dataset",
    "n_digits",
    "train_size",
    "test_size",
    "width",
    "blocks",
    "stages",
    "epochs",
    "batch_size",
    "lr",
    "sn_mode",
    "preset",
)


def rows_at_the_same_scale(rows: list, references: list) -> list:
    """The reference rows whose scale (data set, sizes, network shape, schedule, estimator: SCALE_COLUMNS) is one
    that `rows` have: what another sweep contributes to this one's comparison."""
    scales = {tuple(r.get(k) for k in SCALE_COLUMNS) for r in rows}
    return [r for r in references if tuple(r.get(k) for k in SCALE_COLUMNS) in scales]


def write_report(sweep_dir: str, out: str = None, references=()) -> str:
    """Writes the markdown report (default DIR/report.md) and its figures beside it; returns its path.

    references: results.csv files (or sweep directories) of other sweeps whose trials at this sweep's scale join
    the tables and figures, marked by their source (e.g. the ordinary and the paper's networks beside new
    objectives)."""
    from ..io.checkpoint import atomic_write_text

    own = read_results(sweep_dir)
    all_rows, joined = list(own), []
    for source in references:
        extra = rows_at_the_same_scale(own, read_results(source))  # this sweep's scales, not another reference's
        tag = os.path.basename(
            os.path.dirname(os.path.abspath(source)) if source.endswith(".csv") else os.path.abspath(source)
        )
        for row in extra:
            row["trial"] = f"{row['trial']} ({tag})"
        joined.append(f"{len(extra)} trials at the same scale from `{source}` (marked ({tag}))")
        all_rows += extra
    rows = [r for r in all_rows if r["status"] == "ok"]  # diverged and failed trials have no metrics to average
    if not rows:
        raise ValueError(f"{sweep_dir}: none of its {len(all_rows)} trials finished with status ok")
    out = out or os.path.join(sweep_dir, "report.md")
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    stem = os.path.splitext(os.path.basename(out))[0]
    S = _stage_count(rows)
    figures = []
    for name, title, draw in (
        ("fig2b", "Fig 2b: indices per stage of ordinary networks", lambda p: _fig2b(rows, p)),
        (
            "fig3a",
            "Fig 3a: indices against coupling",
            lambda p: _lines_against_lam(
                rows,
                ("ci", "ri", "di"),
                ("Convergence Index", "Recurrence Index", "Divergence Index"),
                p,
                "Fig 3a: indices against lam (no SN; mean ± sd over seeds)",
            ),
        ),
        (
            "fig3b",
            "Fig 3b: test error against coupling",
            lambda p: _lines_against_lam(
                rows, ("final_test_error",), ("test error",), p, "Fig 3b: error against lam (no SN)"
            ),
        ),
        ("fig3c", "Fig 3c: error against CI and DI", lambda p: _fig3c(rows, p)),
        ("fig4a", "Fig 4a / S2 Fig: spectrally normalised ICR and PCR", lambda p: _fig4a(rows, p)),
        ("error-di", "Test error against DI: objectives for convergence", lambda p: _fig_error_against_di(rows, p)),
    ):
        path = os.path.join(folder, f"{stem}-{name}.png")
        if draw(path):
            figures.append((title, os.path.basename(path)))

    groups = group_trials(all_rows)
    left_out = len(all_rows) - len(rows)
    lines = [
        f"# Sweep report: {os.path.basename(os.path.abspath(sweep_dir))}",
        "",
        f"{len(rows)} finished trials in {len(groups)} groups (trials that differ only in their seed)"
        + (
            f"; {left_out} more diverged or failed and are left out of every mean and figure "
            "(column 'left out'; their reasons are in the last table)"
            if left_out
            else ""
        )
        + (f"; with {', '.join(joined)}" if joined else "")
        + ". "
        "Values are mean ± standard deviation over seeds (sample sd; 0 for a single seed). Test error is the "
        f"final epoch's; chance error {rows[0]['chance_error']:.4f}. Indices: SPEC section 4.",
        "",
        "## Groups",
        "",
        "| group | n | test error | CI | RI | DI | "
        + " | ".join(f"DI s{s}" for s in range(1, S + 1))
        + " | left out |",
        "|---|---|---|---|---|---|" + "---|" * S + "---|",
    ]
    for key, group in groups.items():
        rs = [r for r in group if r["status"] == "ok"]
        cells = [_fmt(*mean_sd([r[m] for r in rs])[:2], 4 if m == "final_test_error" else 3) for m in METRICS]
        cells += [_fmt(*mean_sd([r[f"di_s{s}"] for r in rs])[:2]) for s in range(1, S + 1)]
        dropped = [r["status"] for r in group if r["status"] != "ok"]
        cells.append(", ".join(f"{dropped.count(s)} {s}" for s in sorted(set(dropped))) or "0")
        lines.append(f"| {_label(key)} | {len(rs)} | " + " | ".join(cells) + " |")
    lines += ["", "## Figures", ""]
    for title, name in figures:
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    if has_benefits(rows):
        lines += benefits_section(rows, folder, stem)
    lines += [
        "## Every trial",
        "",
        "| trial | seed | test error | CI | RI | DI | "
        + " | ".join(f"CI s{s} | RI s{s} | DI s{s}" for s in range(1, S + 1))
        + " | train s |",
        "|---|---|---|---|---|---|" + "---|---|---|" * S + "---|",
    ]

    def num(v, d=3):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"

    for r in rows:
        cells = [num(r["final_test_error"], 4), num(r["ci"]), num(r["ri"]), num(r["di"])]
        for s in range(1, S + 1):
            cells += [num(r[f"ci_s{s}"]), num(r[f"ri_s{s}"]), num(r[f"di_s{s}"])]
        lines.append(f"| {r['trial']} | {r['seed']} | " + " | ".join(cells) + f" | {r['train_seconds']:.0f} |")
    if left_out:
        lines += ["", "## Diverged and failed trials", "", "| trial | seed | status | reason |", "|---|---|---|---|"]
        lines += [
            f"| {r['trial']} | {r['seed']} | {r['status']} | {r.get('reason') or ''} |"
            for r in all_rows
            if r["status"] != "ok"
        ]
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out
