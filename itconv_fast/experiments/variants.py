"""What a sweep's trial is, for tables and figures: its variant (family and label), the family's style, the mean
and spread over seeds, and the figure helpers. Shared by the sweep report and its benefits section."""

from __future__ import annotations

import math

__all__ = [
    "objectives_of",
    "variant_of",
    "family_style",
    "mean_sd",
    "pyplot",
    "save_figure",
    "FAMILY_STYLE",
]

FAMILY_STYLE = {
    "ordinary": ("k", "s"),
    "coupling": ("0.5", "D"),
    "ICR": ("C0", "o"),
    "PCR": ("C3", "o"),
    "extra-iterations": ("C2", "^"),
    "fixed-point": ("C1", "v"),
    "jacobian-frobenius": ("C4", "P"),
    "jacobian-spectral": ("C5", "X"),
    "weight-shared extra-iterations": ("C9", "^"),
    "weight-shared PCR extra-iterations": ("C6", "*"),
}


def mean_sd(values):
    """(mean, sample sd, n) of the values that are numbers (None and NaN left out); sd 0 for one value."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan"), 0
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd, len(values)


def objectives_of(row) -> str:
    """The row's objectives as written in results.csv ("name:weight+..."), "" for none (or no such column)."""
    value = row.get("objectives")
    return "" if value in (None, "none") else str(value)


def variant_of(row) -> tuple:
    """(family, label) of a trial: its objectives, spectral normalization, coupling and update, seed and scale
    left out."""
    objectives = objectives_of(row)
    if objectives:
        name, label = objectives.split(":")[0], objectives.replace("+", " + ")
        if row.get("lam", 0) > 0:  # a weight-shared (or coupled) network trained with the objective
            pcr = bool(row.get("pcr")) and row.get("sn_mu") is None  # the stage input at every step ("recall")
            family = f"weight-shared {'PCR ' if pcr else ''}{name}" if row["lam"] == 1 else f"coupling + {name}"
            return family, f"lam {row['lam']:g}, {'PCR update, ' if pcr else ''}{label}"
        return name, label
    if row.get("sn_mu") is not None:
        name = "PCR" if row.get("pcr") else "ICR"
        return name, f"{name}, SN mu {row['sn_mu']:g}"
    if row.get("lam", 0) > 0:
        return "coupling", f"coupling lam {row['lam']:g}"
    if row.get("init_resolved") == "recurrent":
        return "ordinary", "ordinary, recurrent init (lam 0, no SN)"
    return "ordinary", "ordinary (lam 0, no SN)"


def family_style(family: str) -> tuple:
    """(colour, marker) of a family on the figures."""
    return FAMILY_STYLE.get(family, ("C7", "o"))


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported when a figure is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """A figure written atomically (a failed write keeps the previous PNG)."""
    from ..io.checkpoint import atomic_file

    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
