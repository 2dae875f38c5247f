"""Checkpoints are read with weights_only=True: a malicious, truncated or foreign file is a one-line error
naming it (exit code 2 at the CLI), never code execution, and nothing else is written."""

import os
import pickle

import pytest
import torch
from click.testing import CliRunner

from itconv_fast.cli.app import main
from itconv_fast.experiments import training
from itconv_fast.io.checkpoint import CheckpointError, load_checkpoint_state, save_checkpoint
from itconv_fast.models import load_checkpoint

TINY = dict(train_size=64, test_size=32, width=2, blocks=2, batch_size=32, epochs=1)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ITCONV_FAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    os.environ.setdefault("ITCONV_FAST_CACHE", str(out / "cache"))
    training.train(training.config_from("quick", lam=0.5, sn_mu=0.9, **TINY), str(out), progress=False)
    return out


class _RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pt"
    torch.save({"model": {}, "model_config": {}, "config": {}, "payload": _RunsCode(marker)}, path)
    return path, marker


def test_checkpoint_round_trips_under_weights_only(run_dir):
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # would raise on any foreign object
    assert {"model", "model_config", "optimizer", "scheduler", "rng", "epoch", "epochs", "config"} <= set(state)
    model = load_checkpoint(str(run_dir))
    assert model.config["blocks"] == 2 and not model.training


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path, marker = _hostile(tmp_path)
    with pytest.raises(CheckpointError, match="hostile.pt") as info:
        load_checkpoint(str(path))
    assert "\n" not in str(info.value) and "could run code" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0, 10, 200, -100])
def test_truncated_checkpoint_is_a_clean_error(run_dir, tmp_path, cut):
    raw = (run_dir / "checkpoint.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(raw[:cut] if cut >= 0 else raw[:cut])
    with pytest.raises(CheckpointError, match="cut.pt") as info:
        load_checkpoint_state(str(path))
    assert "\n" not in str(info.value)


def test_files_that_are_not_ours_are_refused(tmp_path):
    cases = {
        "text.pt": b"hello, this is not a checkpoint",
        "pickle.pt": pickle.dumps({"a": 1}),
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(str(tmp_path / name))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a dict"):
        load_checkpoint(str(tmp_path / "list.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="missing model"):
        load_checkpoint(str(tmp_path / "other.pt"))
    torch.save({"model": {}, "model_config": {"num_classes": "ten"}}, tmp_path / "badcfg.pt")
    with pytest.raises(CheckpointError, match="does not match an IterResNet"):
        load_checkpoint(str(tmp_path / "badcfg.pt"))


def test_saving_refuses_objects_that_loading_would_refuse(tmp_path):
    with pytest.raises(TypeError, match="payload"):
        save_checkpoint({"payload": object()}, str(tmp_path / "x.pt"))
    assert not (tmp_path / "x.pt").exists()


def test_cli_indices_refuses_hostile_and_truncated_checkpoints(run_dir, tmp_path):
    path, marker = _hostile(tmp_path)
    result = CliRunner().invoke(main, ["indices", str(path)])
    assert result.exit_code == 2, result.output
    assert "hostile.pt" in result.output and "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "indices.json").exists()
    cut = tmp_path / "cut" / "checkpoint.pt"
    cut.parent.mkdir()
    cut.write_bytes((run_dir / "checkpoint.pt").read_bytes()[:1000])
    result = CliRunner().invoke(main, ["indices", str(cut.parent)])
    assert result.exit_code == 2 and "checkpoint.pt" in result.output
    assert sorted(os.listdir(cut.parent)) == ["checkpoint.pt"]


def test_cli_resume_from_a_corrupt_checkpoint_is_a_usage_error(run_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:500])
    args = ["train", "--out", str(out), "--resume", "--no-progress", "--lam", "0.5", "--sn-mu", "0.9"]
    for key, value in TINY.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "checkpoint.pt" in result.output and "--resume" in result.output
    assert sorted(os.listdir(out)) == ["checkpoint.pt"]  # no metrics, config or event files written


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    from itconv_fast.io.checkpoint import atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(str(tmp_path / "a.json"), {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
