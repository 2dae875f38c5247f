"""The benchmarks behind `itconv-fast bench` and benchmarks/: one module per comparison (coupling, spectral,
batch_norm, indices, adaptive_depth, train_step, train_loop against the plain PyTorch loop of plain_loop,
lipschitz; launches, with launch_counter, counts a CUDA step's kernel launches on the CPU), the shared timing
runner, and the suite that runs them all. Builds on every layer below; only the CLI and benchmarks/ import it.
"""

from .adaptive_depth import run_adaptive_depth_benchmark
from .batch_norm import BATCH_NORM_SHAPES, batch_norm_relu_cases, run_batch_norm_relu_benchmark
from .coupling import coupling_cases, resnet_gradient_groups, run_coupling_benchmark
from .indices import run_analysis_benchmark, run_indices_benchmark
from .launches import LAUNCH_CEILINGS, LAUNCH_GOALS, run_launch_count
from .lipschitz import LIPSCHITZ_CASES, lipschitz_step_cases, run_lipschitz_benchmark
from .plain_loop import plain_epochs, train_benchmark_task
from .runner import cpu_model, interleaved_step_times, label_backend, machine_description, run_comparison, save_report
from .spectral import gram_tightness, resnet_block_convs, run_spectral_benchmark, spectral_cases
from .suite import results_markdown, run_all
from .train_loop import run_train_benchmark
from .train_step import run_train_step_benchmark, train_step_cases

__all__ = [
    "resnet_gradient_groups",
    "coupling_cases",
    "run_coupling_benchmark",
    "resnet_block_convs",
    "spectral_cases",
    "run_spectral_benchmark",
    "gram_tightness",
    "run_indices_benchmark",
    "run_analysis_benchmark",
    "run_adaptive_depth_benchmark",
    "train_step_cases",
    "run_train_step_benchmark",
    "LIPSCHITZ_CASES",
    "lipschitz_step_cases",
    "run_lipschitz_benchmark",
    "cpu_model",
    "machine_description",
    "label_backend",
    "run_comparison",
    "save_report",
    "interleaved_step_times",
    "run_all",
    "results_markdown",
    "plain_epochs",
    "run_train_benchmark",
    "train_benchmark_task",
    "run_launch_count",
    "LAUNCH_GOALS",
    "LAUNCH_CEILINGS",
    "BATCH_NORM_SHAPES",
    "batch_norm_relu_cases",
    "run_batch_norm_relu_benchmark",
]
