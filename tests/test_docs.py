"""The documentation site builds with every warning an error (mkdocs --strict, mkdocstrings from the docstrings),
and README stays a landing page whose links reach the pages."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_site_builds_without_warnings(tmp_path):
    pytest.importorskip("mkdocstrings")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "WARNING" not in out.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("soft_couple_", "BatchedSpectralNorm", "IterResNet", "compute_indices", "FixedPointResidual", "train"):
        assert name in api, name


def test_readme_is_a_landing_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 260
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert links
    for link in links:
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert page.name in nav, f"{page.name} is not in the site's navigation"


def test_the_reproduction_page_spells_out_the_indices_names():
    """Readers of the paper search for the indices by their full names; each must appear on one line."""
    text = (ROOT / "docs" / "reproduction.md").read_text()
    for name in ("Convergence Index", "Recurrence Index", "Divergence Index"):
        assert name in text, name
