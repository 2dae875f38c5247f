"""The figure of an analysis: one row per measure (indices' curves, refinement, anytime, traces), one column per
stage (matplotlib, imported when drawn)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .analysis import AnalysisReport

__all__ = ["plot_analysis"]


def plot_analysis(report: AnalysisReport, path: str) -> None:
    """One row per measure (indices' curves, refinement, anytime, traces), one column per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["indices"] + [m for m in ("refinement", "anytime", "traces") if m in report.measures]
    S = len(report.stages)
    fig, axes = plt.subplots(len(rows), S, figsize=(4.2 * S, 3.0 * len(rows)), squeeze=False)
    idx = report.indices
    for s in range(S):
        for r, measure in enumerate(rows):
            ax = axes[r, s]
            if measure == "indices":
                st = idx.stages[s]
                ax.plot(range(1, len(st.e_conv) + 1), st.e_conv, "o-", ms=3, label=f"early read-out (CI {st.ci:.2f})")
                ax.plot(range(1, len(st.e_drop) + 1), st.e_drop, "s-", ms=3, label=f"drop block t (RI {st.ri:.2f})")
                ax.plot(range(1, len(st.e_div) + 1), st.e_div, "^-", ms=3, label=f"extra iterations k (DI {st.di:.2f})")
                ax.axhline(idx.chance_error, color="C3", ls="--", lw=1)
                ax.axhline(idx.error, color="k", ls=":", lw=1)
                ax.set_ylim(-0.02, 1.02)
                ax.set_xlabel("block t / extra iterations k")
                ax.set_ylabel("error")
                ax.legend(fontsize=7)
            elif measure == "refinement":
                ref = report.stages[s].refinement
                ts = range(1, len(ref) + 1)
                ax.plot(ts, [b.cosine_mean for b in ref], "o-", ms=3, color="C0", label="cos(update, -grad)")
                ax.fill_between(
                    ts,
                    [b.cosine_quartiles[0] for b in ref],
                    [b.cosine_quartiles[2] for b in ref],
                    color="C0",
                    alpha=0.2,
                )
                ax.plot(ts, [b.ratio_mean for b in ref], "s-", ms=3, color="C1", label="||update|| / ||z||")
                ax.axhline(0, color="k", lw=0.5)
                ax.set_xlabel("block t")
                ax.legend(fontsize=7)
            elif measure == "anytime":
                st = report.stages[s]
                ks = range(1, len(st.anytime_error) + 1)
                T = len(idx.stages[s].e_drop)
                ax.plot(ks, st.anytime_error, "o-", ms=3, label=f"stage {s + 1} runs k")
                ax.plot(
                    range(1, len(report.anytime_all_error) + 1),
                    report.anytime_all_error,
                    "-",
                    color="0.5",
                    label="all stages run k",
                )
                ax.axvline(T, color="k", ls=":", lw=1)
                ax.axhline(idx.chance_error, color="C3", ls="--", lw=1)
                ax.set_ylim(-0.02, 1.02)
                ax.set_xlabel("iterations k (dotted: trained T)")
                ax.set_ylabel("error")
                ax.legend(fontsize=7)
            else:
                tr = report.stages[s].trace
                ks = range(0, len(tr["fixed_point_residual"]["median"]))
                ax.semilogy(ks, tr["fixed_point_residual"]["median"], "o-", ms=3, label="residual median")
                ax.semilogy(ks, tr["fixed_point_residual"]["p90"], "--", label="residual p90")
                ax.axhline(report.threshold, color="C3", ls=":", lw=1, label=f"threshold {report.threshold:g}")
                if "contraction" in tr:
                    ax.semilogy(
                        range(1, len(tr["contraction"]["median"]) + 1),
                        tr["contraction"]["median"],
                        "s-",
                        ms=3,
                        label="contraction median",
                    )
                ax.set_xlabel("extra iterations k")
                ax.legend(fontsize=7)
            ax.set_title(f"stage {s + 1}: {measure}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
