"""The baseline `itconv-fast bench train` compares against: the paper's ResNet trained by a plain PyTorch loop
(no coupling, no spectral normalization). The loop is itconv_fast/bench/plain_loop.py; this runs it.

    python benchmarks/plain_loop.py [--size quick|paper] [--epochs 3] [--paper-steps 200] [--device cpu]

prints each epoch's record (training-pass seconds, loss, errors) as a JSON line.
"""

import sys

from itconv_fast.bench.plain_loop import main

if __name__ == "__main__":
    sys.exit(main())
