"""Everything a GPU can tell us about the CUDA kernels, in one file to send back (`make gpu-check`).

Runs, on a machine with a GPU and the extension built with its CUDA kernels:
1. `pytest -m cuda` (every CUDA-marked test: the kernels against the reference, bit for bit where the CPU is);
2. `itconv-fast bench --device cuda` (every comparison, side by side; --quick for the short settings);
3. `itconv-fast bench train --device cuda`: epoch times of the plain loop against itconv-fast train, eager and
   compiled (--train-sizes, --paper-steps; --quick: the quick size only);
4. the CUDA-graph check: the quick preset's network with coupling + spectral normalization trained eager, compiled
   and compiled with CUDA graphs (mode="reduce-overhead") from the same weights (benchmarks/compiled_step_probe.py):
   losses against eager, step times;
5. the launch counts of `bench launches` (counted on the CPU emulation of the CUDA path) against the profiler's
   kernels and launch calls for the same steps on the GPU (bench.launches.profile_launch_counts);
6. the ptxas resource usage of every kernel (benchmarks/ptxas_usage.py), when nvcc is there;
and writes {"machine", "pytest": {returncode, summary, tail}, "bench", "train", "cuda_graphs", "launches", "ptxas"}
to --out
(default gpu-check-<host>-<date>.json). Exits non-zero when there is no GPU, or when a test failed.

    python benchmarks/gpu_check.py [--quick] [--train-sizes quick,paper] [--paper-steps 200] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cuda_tests() -> dict:
    cmd = [sys.executable, "-m", "pytest", os.path.join(ROOT, "tests"), "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    env = dict(os.environ, ITCONV_FAST_REQUIRE_EXTENSION="1")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = done.stdout.strip().splitlines()
    summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|error)", line)), "")
    return {"returncode": done.returncode, "summary": summary.strip("= "), "tail": "\n".join(lines[-60:])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the benchmarks' short settings")
    parser.add_argument(
        "--train-sizes", default=None, help="sizes of bench train (default quick,paper; quick with --quick)"
    )
    parser.add_argument("--paper-steps", type=int, default=200, help="steps in an epoch of bench train's paper size")
    parser.add_argument("--out", help="the file to write (JSON)")
    args = parser.parse_args(argv)

    import torch

    import itconv_fast
    from itconv_fast import bench
    from itconv_fast.ops import _extension

    if not torch.cuda.is_available():
        print("gpu-check: no GPU visible to torch (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if not (itconv_fast.extension_loaded() and _extension.cuda_compiled()):
        print("gpu-check: the extension is not built with its CUDA kernels (build with CUDA_HOME set)", file=sys.stderr)
        return 2
    out = args.out or f"gpu-check-{platform.node()}-{datetime.date.today().isoformat()}.json"
    report = {
        "machine": bench.machine_description("cuda"),
        "cuda_runtime": torch.version.cuda,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
    }
    print("pytest -m cuda ...", flush=True)
    report["pytest"] = run_cuda_tests()
    print(report["pytest"]["summary"], flush=True)
    print("itconv-fast bench --device cuda ...", flush=True)
    report["bench"] = bench.run_all(quick=args.quick, device="cuda")
    print(bench.results_markdown(report["bench"]), flush=True)
    sizes = tuple((args.train_sizes or ("quick" if args.quick else "quick,paper")).split(","))
    print(f"itconv-fast bench train --device cuda ({', '.join(sizes)}) ...", flush=True)
    report["train"], table = bench.run_train_benchmark(sizes, device="cuda", paper_steps=args.paper_steps)
    print(table, flush=True)
    print("CUDA graphs (compiled_step_probe, quick preset's network) ...", flush=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compiled_step_probe

    report["cuda_graphs"] = compiled_step_probe.probe("cuda", steps=30, width=8, blocks=4, regularised="regularised")
    print("launches: counted against the profiler ...", flush=True)
    from itconv_fast.bench.launches import profile_launch_counts

    try:
        report["launches"] = profile_launch_counts()
        for case, row in report["launches"].items():
            print(
                f"  {case:28s} counted {row['counted']:5d}  kernels {row['kernels']:5d}  "
                f"launch calls {row['launch_calls']:5d}  memory calls {row['memory_calls']:4d}",
                flush=True,
            )
    except Exception as error:  # recorded, not fatal: the rest of the report still comes back
        report["launches"] = {"error": str(error)[-2000:]}
    try:
        import ptxas_usage

        report["ptxas"] = ptxas_usage.usage()
    except Exception as error:  # nvcc missing or failing: recorded, not fatal
        report["ptxas"] = {"error": str(error)[-2000:]}
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}: send this file back", flush=True)
    return 0 if report["pytest"]["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
