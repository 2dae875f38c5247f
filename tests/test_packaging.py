"""Packages users install without a compiler: `python -m build` makes an sdist that carries everything a build
needs and, from that sdist alone, a wheel; the wheel installed into a fresh venv (no source tree on the path)
imports, runs its ops against their references, reports itself with `itconv-fast info` and trains an epoch.

The wheel is built the way a user with a broken CUDA toolkit builds it (where this machine has a toolkit and a
CUDA build of torch): the CUDA half is given up, the CPU kernels are built, one line says why and the wheel records
it. One C++ build serves the packaging and the fallback (each build of the C++ sources takes minutes here)."""

import json
import pathlib
import re
import subprocess
import sys
import sysconfig
import tarfile

import pytest
from toolkits import clean_env, fake_toolkit, real_toolkit

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_build_requirements_pin_the_torch_the_project_runs():
    pyproject = (ROOT / "pyproject.toml").read_text()
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r'"torch==([\d.]+)"', pyproject).group(1)
    assert re.search(r"^TORCH_VERSION \?= ([\d.]+)$", makefile, re.M).group(1) == pinned
    assert re.search(r'^license = "MIT"$', pyproject, re.M) and (ROOT / "LICENSE").exists()


SMOKE = r"""
import json, os, sys, torch
import itconv_fast
from itconv_fast import ops
from itconv_fast.ops import _reference
assert itconv_fast.__file__.startswith(sys.prefix), itconv_fast.__file__  # the wheel's copy, not the source tree
assert itconv_fast.extension_loaded()
g = torch.Generator().manual_seed(0)
groups = [[torch.randn(5, 7, generator=g) for _ in range(4)]]
expected = [[t.clone() for t in group] for group in groups]
ops.soft_couple_(groups, 0.5)
_reference.soft_couple_(expected, 0.5)
assert all(torch.equal(a, b) for a, b in zip(groups[0], expected[0]))
w = torch.randn(3, 4, 4, 3, 3, generator=g, dtype=torch.float64)
u = ops.init_power_vector(w, "matrix", generator=g)
sigma = ops.batched_spectral_norm(w, u.clone(), mode="matrix", n_iter=200)
exact = torch.linalg.matrix_norm(w.reshape(3, 4, -1), ord=2)
assert torch.allclose(sigma, exact, rtol=1e-6), (sigma, exact)
print("smoke ok")
"""


@pytest.mark.slow
def test_sdist_and_wheel_install_into_a_fresh_venv(tmp_path):
    pytest.importorskip("build")
    torch = pytest.importorskip("torch")
    real = real_toolkit()
    fallback = real is not None and torch.version.cuda is not None
    env = {k: v for k, v in clean_env(MAX_JOBS="2").items() if k != "PYTHONPATH"}
    if fallback:
        env.update(CUDA_HOME=str(fake_toolkit(tmp_path, real)), TORCH_CUDA_ARCH_LIST="9.0")
    else:
        env.update(ITCONV_FAST_CUDA="0")  # a CPU wheel all the same
    dist = tmp_path / "dist"
    installed_record = (ROOT / "itconv_fast" / "_cuda_build.txt").read_text()
    sdist = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sdist.returncode == 0, sdist.stdout[-2000:] + sdist.stderr[-2000:]
    # The sdist built nothing: the source tree's record of its own build is untouched (`itconv-fast info`).
    assert (ROOT / "itconv_fast" / "_cuda_build.txt").read_text() == installed_record
    (archive,) = dist.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert any(n.endswith("csrc/ops/soft_couple.h") for n in names)
    assert any(n.endswith("csrc/ops/cuda/soft_couple_device.cuh") for n in names)
    assert any(n.endswith("csrc/emulation/cuda_shim.h") for n in names)
    assert any(n.endswith("LICENSE") for n in names) and not any(n.endswith(".so") for n in names)
    (source,) = (tmp_path / "unpacked").iterdir()
    wheel = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert wheel.returncode == 0, wheel.stdout[-3000:] + wheel.stderr[-3000:]
    (whl,) = dist.glob("*.whl")
    record = (source / "itconv_fast" / "_cuda_build.txt").read_text().strip()
    if fallback:
        notes = [
            line for line in (wheel.stderr + wheel.stdout).splitlines() if "CUDA kernels could not be built" in line
        ]
        assert len(notes) == 1 and "CUDA_HOME" in notes[0] and "nvcc cannot compile a test kernel" in notes[0], notes
        assert record.startswith("not built: the CUDA build failed (nvcc cannot compile a test kernel")
        # Demanded CUDA is still an error, found before anything compiles.
        forced = subprocess.run(
            [
                sys.executable,
                "setup.py",
                "build_ext",
                "--build-lib",
                str(tmp_path / "l"),
                "--build-temp",
                str(tmp_path / "t"),
            ],
            cwd=source,
            env=dict(env, ITCONV_FAST_CUDA="1"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert forced.returncode != 0 and "ITCONV_FAST_CUDA=1 but nvcc cannot compile" in forced.stderr
        assert not (tmp_path / "t").exists() or not list((tmp_path / "t").rglob("*.o"))
    else:
        assert record == "not built: ITCONV_FAST_CUDA=0"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # The dependencies (torch, numpy, click, ...) come from this environment's site-packages as a plain path:
    # its .pth files (the editable install of the source tree among them) are not processed there.
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (pathlib.Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(whl)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    run_env = dict(env, ITCONV_FAST_CACHE=str(tmp_path / "cache"))
    smoke = subprocess.run([str(py), "-c", SMOKE], cwd=work, env=run_env, capture_output=True, text=True, timeout=600)
    assert smoke.returncode == 0 and "smoke ok" in smoke.stdout, smoke.stdout[-2000:] + smoke.stderr[-2000:]
    cli = venv / "bin" / "itconv-fast"
    info = subprocess.run([str(cli), "info"], cwd=work, env=run_env, capture_output=True, text=True, timeout=300)
    report = json.loads(info.stdout)
    assert report["extension_loaded"] and report["cuda_build"] == record
    probe = "import itconv_fast, torch; print(torch.ops.itconv_fast._build_info())"
    built = subprocess.run([str(py), "-c", probe], cwd=work, env=run_env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0 and "cuda=0" in built.stdout, built.stderr[-2000:]
    train = subprocess.run(
        [
            str(cli),
            "train",
            "--epochs",
            "1",
            "--train-size",
            "64",
            "--test-size",
            "32",
            "--width",
            "4",
            "--blocks",
            "2",
            "--no-progress",
            "--out",
            str(work / "run"),
        ],
        cwd=work,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0 and "done: 1 epochs" in train.stdout, train.stdout[-2000:] + train.stderr[-2000:]
