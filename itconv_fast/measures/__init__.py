"""What is measured on a trained residual model: the three indices of iterative convergence
(`compute_indices`), the analyses beyond them (`analyze`), per-layer Lipschitz constants
(`lipschitz_report`) and what converging buys: `thinking_longer_report` (test-time iterations),
`adaptive_depth_report` and `robustness_report`.
Builds on models (any model of the residual-model protocol), nn and ops.
"""

from .adaptive_depth import AdaptiveDepthReport, adaptive_depth_report
from .analysis import MEASURES, AnalysisReport, BlockRefinement, StageAnalysis, analyze
from .analysis_plot import plot_analysis
from .indices import IndexReport, StageIndices, compute_indices, index_flops
from .lipschitz import LayerLipschitz, LipschitzReport, circular_exact_sigmas, lipschitz_report
from .robustness import RobustnessReport, robustness_report
from .thinking_longer import ThinkingLongerReport, thinking_longer_report

__all__ = [
    "compute_indices",
    "IndexReport",
    "StageIndices",
    "index_flops",
    "analyze",
    "AnalysisReport",
    "StageAnalysis",
    "BlockRefinement",
    "MEASURES",
    "plot_analysis",
    "lipschitz_report",
    "LipschitzReport",
    "LayerLipschitz",
    "circular_exact_sigmas",
    "thinking_longer_report",
    "ThinkingLongerReport",
    "robustness_report",
    "RobustnessReport",
    "adaptive_depth_report",
    "AdaptiveDepthReport",
]
