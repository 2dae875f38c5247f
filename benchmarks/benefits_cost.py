"""What `benefits` costs against `indices` on one run, part by part (benchmarks/NOTES.md, "Benefits against indices:
the floor the measures set"): two rounds of indices, all benefits at their defaults, thinking longer on every set and
on the test set alone, adaptive depth, the noise errors, and PGD at each default epsilon, each timed alone.

    .venv/bin/python benchmarks/benefits_cost.py runs/sweep-benefits-12k/trials/seed=0 500    # 500 test images
"""

import sys
import time

from itconv_fast.experiments.benefits import benefits_of_run
from itconv_fast.experiments.evaluation import indices_of_run
from itconv_fast.measures.robustness import DEFAULT_EPSILONS


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(run: str, test_size=None) -> None:
    def part(**kwargs):
        return seconds(lambda: benefits_of_run(run, test_size=test_size, **kwargs))

    part(measures=["thinking-longer"])  # generates and caches the harder test sets: not timed
    for round_ in range(2):
        indices = seconds(lambda: indices_of_run(run, test_size=test_size))
        benefits = part()
        thinking = part(measures=["thinking-longer"])
        test_set = part(measures=["thinking-longer"], harder_digits=(), noise_sigma=None)
        adaptive = part(measures=["adaptive-depth"])
        noise = part(measures=["robustness"], epsilons=())
        pgd = [part(measures=["robustness"], sigmas=(), epsilons=(eps,)) for eps in DEFAULT_EPSILONS]
        print(
            f"round {round_}: indices {indices:.1f} s, benefits {benefits:.1f} s ({benefits / indices:.2f}x) | "
            f"thinking longer {thinking:.1f} (test set alone {test_set:.1f}) | adaptive depth {adaptive:.1f} | "
            f"noise {noise:.1f} | PGD " + " / ".join(f"{p:.1f}" for p in pgd),
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
