"""Resource usage of every CUDA kernel, from ptxas (`-Xptxas -v`), per architecture: registers per thread,
stack frame, spill stores and loads, shared memory. Needs nvcc (no GPU): it compiles csrc/ops/cuda/*.cu with
the flags of the extension build (setup.py) to an object file that is thrown away.

    python benchmarks/ptxas_usage.py [--arch 80 90] [--json FILE] [--markdown]

tests/test_ptxas.py runs it and fails on a local-memory spill or stack frame in any kernel.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def nvcc_path() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("nvcc")


def compile_flags() -> list[str]:
    """The include folders and defines of the extension build (setup.py), for a compile-only run."""
    import torch
    from torch.utils import cpp_extension

    try:
        includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch
        includes = cpp_extension.include_paths(cuda=True)
    flags = [
        "-std=c++20",
        "-O3",
        "--fmad=false",
        "-DITCONV_WITH_CUDA",
        *cpp_extension.COMMON_NVCC_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
        "-I" + os.path.join(ROOT, "csrc"),
        "-I" + sysconfig.get_paths()["include"],
    ]
    flags += ["-I" + path for path in includes]
    try:  # the CUDA libraries' headers inside torch's wheels, searched after the toolkit's (as setup.py does)
        import nvidia

        for root in nvidia.__path__:
            for header in glob.glob(os.path.join(root, "*", "include", "cusparse.h")):
                flags.append(f"-Xcompiler=-idirafter{os.path.dirname(header)}")
    except ImportError:
        pass
    return flags


def demangle(names: list[str]) -> dict:
    if not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse(log: str, source: str) -> list[dict]:
    """One row per (kernel, architecture) from ptxas -v output."""
    rows, current = [], None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = {"source": source, "kernel": m.group(1), "arch": m.group(2)}
            rows.append(current)
        elif current is not None and (m := _FRAME.search(line)):
            current.update(
                stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)), spill_load_bytes=int(m.group(3))
            )
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            current["smem_bytes"] = int(s.group(1)) if s else 0
    names = demangle([r["kernel"] for r in rows])
    for r in rows:
        r["kernel"] = names[r["kernel"]]
    return rows


def usage(arches=("80", "90")) -> list[dict]:
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    flags = compile_flags()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arches]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "ops", "cuda", "*.cu"))):
            # -fatbin compiles the device code alone: ptxas reports the same, without the host compile of the
            # torch headers (2.1x faster, the same rows: benchmarks/NOTES.md, "make test in parallel").
            cmd = [nvcc, "-fatbin", source, "-o", os.path.join(tmp, "out.fatbin"), "-Xptxas", "-v", *gencode, *flags]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"nvcc failed on {source}:\n{done.stderr[-4000:]}")
            rows += parse(done.stdout + done.stderr, os.path.relpath(source, ROOT))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | arch | registers | stack | spill st/ld | smem |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| `{r['kernel']}` | {r['arch']} | {r.get('registers')} | {r.get('stack_bytes')} B | "
            f"{r.get('spill_store_bytes')}/{r.get('spill_load_bytes')} B | {r.get('smem_bytes')} B |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["80", "90"])
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    rows = usage(args.arch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows) if args.markdown else json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
