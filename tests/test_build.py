"""The build cannot fail for want of CUDA: setup.py finds the toolkit that a wrapper `nvcc` on PATH really runs,
finds a broken toolkit in seconds (before compiling anything), and records why it built no CUDA kernels. The
whole fallback build, a broken toolkit's wheel installed and run, is tests/test_packaging.py's."""

import os
import subprocess
import sys

import pytest
from toolkits import ROOT, clean_env, fake_toolkit, real_toolkit, source_copy

SETUP_MODULE = (
    "import importlib.util, sys; spec = importlib.util.spec_from_file_location('itconv_setup', sys.argv[1]); "
    "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
)


def test_the_toolkit_behind_a_wrapper_nvcc_is_found(tmp_path):
    toolkit = real_toolkit()
    if toolkit is None:
        pytest.skip("no CUDA toolkit on this machine")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "lib").mkdir()  # like /usr/local: a lib folder beside the wrapper, but no CUDA runtime in it
    (tmp_path / "include").mkdir()
    wrapper = bin_dir / "nvcc"  # like /usr/local/bin/nvcc on our machines: a script outside the toolkit
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    code = SETUP_MODULE + "print(m.find_cuda_home())"
    env = clean_env(PATH=f"{bin_dir}:/usr/bin:/bin")
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "setup.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert os.path.realpath(out.stdout.strip().splitlines()[-1]) == toolkit


def test_a_broken_toolkit_is_found_before_anything_compiles(tmp_path):
    """nvcc_failure compiles a one-line kernel: a working toolkit passes, a broken one is named in seconds."""
    real = real_toolkit()
    if real is None:
        pytest.skip("no CUDA toolkit on this machine")
    code = SETUP_MODULE + "print(repr(m.nvcc_failure(sys.argv[2])))"
    for home, expected in ((real, "''"), (fake_toolkit(tmp_path, real), "this toolkit is broken on purpose")):
        out = subprocess.run(
            [sys.executable, "-c", code, str(ROOT / "setup.py"), str(home)],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert expected in out.stdout.strip().splitlines()[-1]


def test_cuda_switched_off_is_recorded_by_the_build_not_by_an_import(tmp_path):
    """ITCONV_FAST_CUDA=0: no CUDA kernels, and the reason is kept for the build to record in
    itconv_fast/_cuda_build.txt (`itconv-fast info`). Importing setup.py (an sdist build does) writes nothing: it
    used to overwrite the record of the build that is installed."""
    src = source_copy(tmp_path)
    record = src / "itconv_fast" / "_cuda_build.txt"
    record.write_text("built\n")
    code = SETUP_MODULE + "print(m.want_cuda(), m.CPU_ONLY_REASON['reason'])"
    out = subprocess.run(
        [sys.executable, "-c", code, str(src / "setup.py")],
        env=clean_env(ITCONV_FAST_CUDA="0"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=src,
    )
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "False ITCONV_FAST_CUDA=0", out.stderr[-2000:]
    assert record.read_text() == "built\n"
