"""Interleaved A/B measurements of the CPU coupling kernel's machine-dependent choices
(csrc/ops/cpu/cpu_features.h), each setting in its own process (the choices are read once per process),
processes alternating A, B, A, B, ...; medians over the rounds.

    python benchmarks/cpu_tuning_ab.py --out benchmarks/results/cpu-tuning-ab.json

Cases:
- l1: 10 page-congruent members (every member's start in the same L1 set), uniform lam, one thread:
  this machine's L1 geometry against a 48 KiB 12-way one (which would allow 10 such members in the
  register path).
- avx2-limit: the AVX2 clone on 16 spread-out members: register-path limit 7 (the AVX2 default: 16
  members cannot stay in 16 ymm registers) against 16.
- build: the whole op on the ResNet-101-16 gradient set with two builds (--baseline-tree: a checkout of
  the previous commit with `python setup.py build_ext --inplace`), for "no slower than before".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, torch
from torch.utils import benchmark
from itconv_fast import ops
from itconv_fast.ops import _extension
case, n, numel, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
if case == "resnet":
    from itconv_fast.bench import resnet_gradient_groups
    groups = resnet_gradient_groups(width=16)
else:
    if case == "congruent":  # page-aligned, so all members start in one L1 set
        store = torch.empty(n * (numel + 1024) + 1024)
        base = (-store.data_ptr() // 4) % 1024
        stride = ((numel + 1023) // 1024) * 1024
        groups = [[store[base + k * stride: base + k * stride + numel] for k in range(n)]]
    else:  # spread: starts 64 bytes apart in the set index
        store = torch.empty(n * (numel + 1040) + 1024)
        stride = ((numel + 1023) // 1024) * 1024 + 16
        groups = [[store[k * stride: k * stride + numel] for k in range(n)]]
    for t in groups[0]:
        t.normal_()
timer = benchmark.Timer("ops.soft_couple_(groups, 0.5)", globals={"ops": ops, "groups": groups}, num_threads=threads)
m = timer.blocked_autorange(min_run_time=0.6)
print(json.dumps({"median_s": m.median, "info": _extension.cpu_info()}))
"""


def run_child(python, env, args):
    out = subprocess.run(
        [python, "-c", CHILD, *map(str, args)], env={**os.environ, **env}, capture_output=True, text=True, timeout=600
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def ab(name, a, b, args, rounds):
    """a, b: (label, env). Alternating rounds; returns a JSON-ready row."""
    times = {a[0]: [], b[0]: []}
    info = {}
    for _ in range(rounds):
        for label, env in (a, b):
            r = run_child(sys.executable, env, args)
            times[label].append(r["median_s"])
            info[label] = r["info"]
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {
        "case": name,
        "args": args,
        "rounds": rounds,
        "median_s": med,
        "all_s": times,
        "ratio_b_over_a": med[b[0]] / med[a[0]],
        "settings": info,
    }
    print(
        f"{name}: {a[0]} {med[a[0]] * 1e6:.1f} us, {b[0]} {med[b[0]] * 1e6:.1f} us "
        f"(B/A {row['ratio_b_over_a']:.2f}, {rounds} rounds)"
    )
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--baseline-tree",
        default=None,
        help="a checkout of the previous commit with its extension built in place (PYTHONPATH)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [
        ab(
            "l1: 10 congruent members, 36,864 floats, 1 thread",
            ("this machine's L1", {}),
            ("48 KiB 12-way L1", {"ITCONV_FAST_L1": "49152,12"}),
            ["congruent", 10, 36864, 1],
            args.rounds,
        ),
        ab(
            "avx2-limit: AVX2 clone, 16 spread members, 36,864 floats, 1 thread",
            ("limit 7", {"ITCONV_FAST_CPU_ISA": "avx2"}),
            ("limit 16", {"ITCONV_FAST_CPU_ISA": "avx2", "ITCONV_FAST_REGISTER_LIMIT": "16"}),
            ["spread", 16, 36864, 1],
            args.rounds,
        ),
    ]
    if args.baseline_tree:
        rows.append(
            ab(
                "build: ResNet-101-16 gradients, 2 threads",
                ("previous build", {"PYTHONPATH": args.baseline_tree}),
                ("this build", {}),
                ["resnet", 0, 0, 2],
                args.rounds,
            )
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
