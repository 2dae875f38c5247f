"""CUDA toolkits for the build tests: the machine's real one, and a broken one that reports the real version."""

import os
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parents[1]


def real_toolkit():
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            return os.path.realpath(candidate)
    nvcc = shutil.which("nvcc")
    if nvcc and os.path.isfile(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "nvcc")):
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST")}
    env.update(extra)
    return env


def fake_toolkit(tmp_path, real) -> pathlib.Path:
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


def source_copy(tmp_path) -> pathlib.Path:
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
