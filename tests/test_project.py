"""README, Makefile and CI cannot drift apart."""

import os
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^make test$", ci, re.M), "CI must call README's test command"
    assert "make test" in readme and "make train" in readme


def test_make_train_runs_the_documented_main_job():
    makefile = (ROOT / "Makefile").read_text()
    readme = (ROOT / "README.md").read_text()
    args = re.search(r"^ARGS \?= (.*)$", makefile, re.M).group(1)
    assert f"itconv-fast train {args}" in readme
    assert args == "--lam 0.5 --sn-mu 0.95"


def test_cuda_builds_ship_ptx_of_the_newest_arch():
    """setup.py's default arch list, and the Makefile's, end with +PTX: GPUs newer than the list (a later
    Blackwell or Rubin part) JIT-compile the PTX instead of failing with "no kernel image"."""
    import re

    from torch.utils.cpp_extension import _get_cuda_arch_flags

    setup_py = (ROOT / "setup.py").read_text()
    default = re.search(r'DEFAULT_CUDA_ARCH_LIST = "([^"]+)"', setup_py).group(1)
    makefile = (ROOT / "Makefile").read_text()
    assert f"export TORCH_CUDA_ARCH_LIST ?= {default}\n" in makefile
    archs = default.split(";")
    assert archs[-1].endswith("+PTX") and {"8.0", "9.0"} <= set(archs)
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = default
    try:
        flags = _get_cuda_arch_flags()
    finally:
        if old is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    newest = archs[-1].removesuffix("+PTX").replace(".", "")
    assert f"-gencode=arch=compute_{newest},code=compute_{newest}" in flags
    assert all(
        f"-gencode=arch=compute_{a.replace('.', '')},code=sm_{a.replace('.', '')}" in flags
        for a in (x.removesuffix("+PTX") for x in archs)
    )


def test_every_import_the_readme_and_docs_show_works():
    """Each `from itconv_fast... import ...` / `import itconv_fast...` line of README.md and docs/*.md runs."""
    import importlib
    import importlib.util

    texts = [(ROOT / "README.md").read_text()] + [p.read_text() for p in (ROOT / "docs").glob("*.md")]
    lines = {
        m.group(0).strip()
        for text in texts
        for m in re.finditer(r"^\s*(?:from itconv_fast[\w.]* import [\w, ]+|import itconv_fast[\w.]*)\s*$", text, re.M)
    }
    assert len(lines) >= 8
    for line in sorted(lines):
        if line.startswith("import "):
            importlib.import_module(line.split()[1])
            continue
        module, names = re.match(r"from (\S+) import (.+)", line).groups()
        imported = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}"), f"{line}: no {name}"


def test_the_names_users_reach_for_are_at_the_package_top():
    import itconv_fast

    for name in (
        "compute_indices",
        "analyze",
        "IterResNet",
        "GradientCoupler",
        "ResidualStack",
        "transformer_encoder_adapter",
        "lipschitz_report",
        "spectral_norm",
        "BatchedSpectralNorm",
        "train",
        "TrainConfig",
        "indices_of_run",
        "load_checkpoint",
        "soft_couple_",
        "batched_spectral_norm",
    ):
        assert name in itconv_fast.__all__ and getattr(itconv_fast, name) is not None, name
    assert all(hasattr(itconv_fast, name) for name in itconv_fast.__all__)
