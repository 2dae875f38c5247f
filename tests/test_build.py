"""The build cannot fail for want of CUDA: setup.py finds the toolkit that a wrapper `nvcc` on PATH really runs,
and when the CUDA half does not build it builds the CPU kernels, says why in one line, and records it."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _real_toolkit():
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            return os.path.realpath(candidate)
    nvcc = shutil.which("nvcc")
    if nvcc and os.path.isfile(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "nvcc")):
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST")}
    env.update(extra)
    return env


def test_the_toolkit_behind_a_wrapper_nvcc_is_found(tmp_path):
    toolkit = _real_toolkit()
    if toolkit is None:
        pytest.skip("no CUDA toolkit on this machine")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "lib").mkdir()  # like /usr/local: a lib folder beside the wrapper, but no CUDA runtime in it
    (tmp_path / "include").mkdir()
    wrapper = bin_dir / "nvcc"  # like /usr/local/bin/nvcc on our machines: a script outside the toolkit
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    code = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('itconv_setup', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.find_cuda_home())"
    )
    env = _clean_env(PATH=f"{bin_dir}:/usr/bin:/bin")
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


def _source_copy(tmp_path) -> pathlib.Path:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "csrc", src / "csrc")
    shutil.copytree(
        ROOT / "itconv_fast",
        src / "itconv_fast",
        ignore=shutil.ignore_patterns("*.so", "__pycache__", "_cuda_build.txt"),
    )
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    return src


def _fake_toolkit(tmp_path, real) -> pathlib.Path:
    """A CUDA toolkit whose nvcc reports the real version but cannot compile anything."""
    fake = tmp_path / "fakecuda"
    (fake / "bin").mkdir(parents=True)
    (fake / "lib64").mkdir()
    os.symlink(os.path.join(real, "include"), fake / "include")
    nvcc = fake / "bin" / "nvcc"
    nvcc.write_text(
        f'#!/bin/sh\ncase "$*" in *--version*|*-V*) exec {real}/bin/nvcc --version;; esac\n'
        'echo "nvcc: this toolkit is broken on purpose" >&2\nexit 1\n'
    )
    nvcc.chmod(0o755)
    return fake


@pytest.mark.slow
def test_a_failing_cuda_build_falls_back_to_the_cpu_kernels(tmp_path):
    real = _real_toolkit()
    torch = pytest.importorskip("torch")
    if real is None or torch.version.cuda is None:
        pytest.skip("needs a CUDA toolkit and a CUDA build of torch (to attempt the CUDA half)")
    src = _source_copy(tmp_path)
    env = _clean_env(CUDA_HOME=str(_fake_toolkit(tmp_path, real)), TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS="2")
    build = [
        sys.executable,
        "setup.py",
        "build_ext",
        "--build-lib",
        str(tmp_path / "lib"),
        "--build-temp",
        str(tmp_path / "tmp"),
    ]
    out = subprocess.run(build, cwd=src, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    notes = [line for line in out.stderr.splitlines() if "the CUDA kernels could not be built" in line]
    assert len(notes) == 1 and "CUDA_HOME" in notes[0]
    record = (src / "itconv_fast" / "_cuda_build.txt").read_text()
    assert record.startswith("not built: the CUDA build failed")
    assert (tmp_path / "lib" / "itconv_fast" / "_cuda_build.txt").read_text() == record
    (library,) = (tmp_path / "lib" / "itconv_fast").glob("_C*.so")
    probe = "import sys, torch; torch.ops.load_library(sys.argv[1]); print(torch.ops.itconv_fast._build_info())"
    info = subprocess.run([sys.executable, "-c", probe, str(library)], capture_output=True, text=True, timeout=300)
    assert info.returncode == 0 and "cuda=0" in info.stdout, info.stderr[-2000:]
    # Demanded CUDA is still an error.
    forced = subprocess.run(
        build, cwd=src, env=dict(env, ITCONV_FAST_CUDA="1"), capture_output=True, text=True, timeout=1500
    )
    assert forced.returncode != 0
