"""README, Makefile and CI cannot drift apart."""

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
