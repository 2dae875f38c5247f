"""Run configurations: validation of every field, YAML files, precedence, and the round trip
YAML -> run -> config.yaml -> the same run."""

import json
import math

import pytest
import yaml
from click.testing import CliRunner

from itconv_fast.cli.app import main
from itconv_fast.experiments.config import FIELDS, ConfigError, TrainConfig, build_config, config_from, load_config_file

TINY = {
    "train_size": 96,
    "test_size": 32,
    "width": 2,
    "blocks": 2,
    "batch_size": 32,
    "epochs": 2,
    "lam": 0.5,
    "sn_mu": 0.9,
}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ITCONV_FAST_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "key,value",
    [
        ("lam", 1.5),
        ("lam", -0.1),
        ("lam", math.nan),
        ("lam", "0.5"),
        ("lam", True),
        ("sn_mu", 0.0),
        ("sn_mu", math.inf),
        ("lr", math.nan),
        ("lr", 0),
        ("weight_decay", -1.0),
        ("bn_gamma_init", math.nan),
        ("width", 0),
        ("width", 2.5),
        ("blocks", True),
        ("epochs", None),
        ("dataset", "imagenet"),
        ("sn_mode", "svd"),
        ("pcr", "yes"),
        ("coupling_bandwidth", 0.5),
        ("init", "random"),
        ("preset", "huge"),
        ("seed", 1.0),
    ],
)
def test_every_bad_value_names_its_key(key, value):
    with pytest.raises(ConfigError, match=key) as info:
        TrainConfig(**{key: value})
    assert info.value.key == key


def test_combinations_that_cannot_train_are_refused():
    with pytest.raises(ConfigError, match="skip_first"):
        TrainConfig(blocks=4, skip_first=4)
    with pytest.raises(ConfigError, match="accumulate"):
        TrainConfig(batch_size=10, accumulate=3)


def test_numbers_are_normalised():
    config = TrainConfig(lam=1, sn_mu=1, lr=1)
    assert isinstance(config.lam, float) and isinstance(config.sn_mu, float) and isinstance(config.lr, float)


def test_explicit_none_overrides_a_preset_value_and_config_from_keeps_it():
    assert build_config("quick", {"train_size": None}).train_size is None
    assert config_from("quick", train_size=None).train_size == 12000


def test_config_file_errors(tmp_path):
    cases = {"list.yaml": "- 1\n- 2\n", "unknown.yaml": "lamb: 0.5\n", "syntax.yaml": "lam: [\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=name):
            load_config_file(str(tmp_path / name))
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config_file(str(tmp_path / "missing.yaml"))
    (tmp_path / "empty.yaml").write_text("")
    assert load_config_file(str(tmp_path / "empty.yaml")) == {}


@pytest.mark.parametrize("option", ["--lam", "--sn-mu", "--lr", "--weight-decay", "--bn-gamma-init"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_flags_are_usage_errors_before_anything_is_printed_or_written(tmp_path, option, value):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--out", str(out), option, value])
    assert result.exit_code == 2, result.output
    assert option in result.output and ("finite" in result.output or "range" in result.output)
    assert not result.output.startswith("training") and not out.exists()


@pytest.mark.parametrize(
    "text,hint",
    [
        ("lam: 2\n", "lam"),
        ("lam: .nan\n", "lam"),
        ("lamb: 1\n", "lamb"),
        ("- lam\n", "mapping"),
        ("blocks: 2\nskip_first: 3\n", "skip_first"),
    ],
)
def test_bad_config_files_are_usage_errors_that_write_nothing(tmp_path, text, hint):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--config", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "--config" in result.output and "run.yaml" in result.output and hint in result.output
    assert not out.exists()


def test_flags_override_the_file_and_the_file_overrides_the_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**TINY, "epochs": 1, "pcr": True, "lr": 0.05}))
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["train", "--config", str(path), "--out", str(out), "--icr", "--seed", "3", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert set(written) == set(FIELDS)
    assert written["pcr"] is False and written["seed"] == 3  # flags win
    assert written["lr"] == 0.05 and written["epochs"] == 1  # the file wins over the preset
    assert written["warmup_epochs"] == 0.5 and written["preset"] == "quick"  # the preset fills the rest


def test_round_trip_yaml_run_config_yaml_same_run(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(TINY))
    first, second = tmp_path / "first", tmp_path / "second"
    assert (
        CliRunner().invoke(main, ["train", "--config", str(path), "--out", str(first), "--no-progress"]).exit_code == 0
    )
    result = CliRunner().invoke(
        main, ["train", "--config", str(first / "config.yaml"), "--out", str(second), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert (first / "config.yaml").read_text() == (second / "config.yaml").read_text()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (first, second))
    assert a["config"] == b["config"]
    keys = ("train_loss", "train_error", "test_loss", "test_error", "lr")
    assert [[e[k] for k in keys] for e in a["epochs"]] == [[e[k] for k in keys] for e in b["epochs"]]


def test_every_run_writes_metrics_csv_and_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(TINY))
    assert CliRunner().invoke(main, ["train", "--config", str(path), "--out", str(out), "--no-progress"]).exit_code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0] == "epoch,train_loss,train_error,test_loss,test_error,lr,seconds,train_seconds"
    assert len(lines) == 1 + len(metrics["epochs"])
    assert float(lines[2].split(",")[4]) == metrics["epochs"][1]["test_error"]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("error/test")
    assert [s.step for s in scalars] == [1, 2]
    assert scalars[1].value == pytest.approx(metrics["epochs"][1]["test_error"])
    assert {"loss/train", "loss/test", "error/train", "lr"} <= set(events.Tags()["scalars"])


def test_shipped_configuration_files_are_valid():
    import glob
    import os

    from itconv_fast.experiments import sweep as sweeps

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    runs = glob.glob(os.path.join(root, "*.yaml"))
    sweep_files = glob.glob(os.path.join(root, "sweeps", "*.yaml"))
    assert runs and sweep_files
    for path in runs:
        values = load_config_file(path)
        build_config(values.pop("preset", "quick"), values)
    for path in sweep_files:
        assert sweeps.expand(sweeps.load_sweep(path))
