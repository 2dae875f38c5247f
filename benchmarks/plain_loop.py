"""The baseline `itconv-fast bench train` compares against: the paper's ResNet trained by a plain PyTorch loop
(no coupling, no spectral normalization; itconv_fast/bench/plain_loop.py holds the loop).

    python benchmarks/plain_loop.py [--size quick|paper] [--epochs 3] [--device cpu]

prints each epoch's record (training-pass seconds, loss, errors).
"""

from __future__ import annotations

import argparse
import json
import sys

from itconv_fast.bench.plain_loop import plain_epochs
from itconv_fast.bench.train_loop import train_benchmark_task


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("quick", "paper"), default="quick")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--paper-steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    task, values = train_benchmark_task(args.size, paper_steps=args.paper_steps)
    for record in plain_epochs(task, width=values["width"], blocks=values["blocks"], epochs=args.epochs,
                               batch_size=values["batch_size"], lr=values["lr"],
                               warmup_epochs=values.get("warmup_epochs", 1.0), device=args.device):
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
