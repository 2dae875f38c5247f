"""Long runs that fail well: diverging training, sweeps with diverged and crashed trials, one driver per sweep
directory, and writes that fail half-way (a full disk) leaving the previous files intact."""

import csv
import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from click.testing import CliRunner

from itconv_fast.cli.app import main
from itconv_fast.data import datasets
from itconv_fast.experiments import divergence, run_parts, training
from itconv_fast.experiments import report as reports
from itconv_fast.experiments import sweep as sweeps
from itconv_fast.experiments.config import config_from
from itconv_fast.experiments.divergence import EXIT_DIVERGED, TrainingDiverged
from itconv_fast.experiments.step import TrainStep
from itconv_fast.experiments.sweep_lock import LOCK_NAME, SweepLocked, sweep_lock
from itconv_fast.io import checkpoint
from itconv_fast.models import IterResNet, load_checkpoint
from itconv_fast.nn import GradientCoupler

SMALL = dict(train_size=96, test_size=32, width=4, blocks=2, batch_size=32)
FLAGS = ["--train-size", "2048", "--test-size", "64", "--width", "4", "--blocks", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ITCONV_FAST_CACHE", str(tmp_path / "cache"))


def _task_that_diverges_at(call: int, config):
    """The run's task whose loss turns NaN at its `call`-th training evaluation (later epochs' steps)."""
    task = datasets.load(
        config.dataset,
        n_digits=config.n_digits,
        train_size=config.train_size,
        test_size=config.test_size,
        seed=config.seed,
        cache_dir=datasets.default_cache_dir(),
    )
    real, calls = task.loss, [0]

    def loss(logits, y):
        value = real(logits, y)
        if logits.requires_grad:
            calls[0] += 1
            if calls[0] >= call:
                return value * float("nan")
        return value

    task.loss = loss
    return task


# ---------------------------------------------------------------------------------------------------------
# 1. Divergence


def _step_fixture():
    torch.manual_seed(0)
    model = IterResNet(num_classes=3, in_channels=1, width=2, blocks=2, stages=1, input_size=4).train()

    class Task:
        loss = staticmethod(torch.nn.functional.cross_entropy)

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return (
        model,
        Task(),
        opt,
        sched,
        TrainStep(model, Task(), opt, sched, GradientCoupler(model, 0.0), device=torch.device("cpu")),
    )


def test_a_nan_loss_takes_no_step():
    model, task, opt, sched, step = _step_fixture()
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    step(x, y, 0)  # one good step: momentum buffers exist
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    with pytest.raises(TrainingDiverged, match="non-finite loss") as caught:
        step(x * float("nan"), y, 0)
    assert caught.value.rule == "non-finite loss" and caught.value.step_refused
    for k, v in model.state_dict().items():  # the running statistics the forward changed are put back too
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(m, opt.state[p]["momentum_buffer"]) for m, p in zip(moments, model.parameters()))
    assert sched.last_epoch == 1


def test_an_exploding_finite_loss_takes_no_step_and_says_which_rule():
    model, task, opt, sched, step = _step_fixture()
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    step(x, y, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step.loss_limit = divergence.exploding_loss_limit(task.loss, 3, y[0])
    assert step.loss_limit == pytest.approx(divergence.EXPLODING_LOSS_FACTOR * math.log(3))
    with torch.no_grad():
        model.head[-1].weight.mul_(1e6)  # finite logits of ~1e6: a finite loss far above the limit
    before["head.4.weight"] = model.head[-1].weight.clone()
    with pytest.raises(TrainingDiverged, match="exploding loss") as caught:
        step(x, y, 0)
    assert caught.value.rule == "exploding loss" and math.isfinite(caught.value.value)
    assert caught.value.value > caught.value.limit == step.loss_limit
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sched.last_epoch == 1
    step.loss_limit = None  # without a limit the same finite loss is a step
    step(x, y, 0)
    assert sched.last_epoch == 2


def test_the_loss_at_chance_of_a_digitclutter_task():
    task = datasets.load(
        "digitclutter", n_digits=3, train_size=8, test_size=8, seed=0, cache_dir=datasets.default_cache_dir()
    )
    limit = divergence.exploding_loss_limit(task.loss, task.num_classes, task.train.targets[0])
    assert limit == pytest.approx(divergence.EXPLODING_LOSS_FACTOR * 10 * math.log(2))


def test_a_non_finite_buffer_at_an_epoch_end_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A finite loss and gradient, but a BatchNorm running_var that turns infinite during epoch 2: that epoch is
    not checkpointed and the run says which rule stopped it."""
    build, calls = training.build_model, [0]

    def build_with_a_bad_buffer(config, task):
        model = build(config, task)

        def poison(module, args, output):  # (on the model: the fused BatchNorm + ReLU runs no module hook)
            if module.training:
                calls[0] += 1
                if calls[0] == steps_per_epoch + 1:
                    module.stages[0].blocks[0].bn1.running_var[0] = float("inf")

        model.register_forward_hook(poison)
        return model

    monkeypatch.setattr(run_parts, "build_model", build_with_a_bad_buffer)  # what training_parts calls
    config = config_from("quick", epochs=3, **SMALL)
    steps_per_epoch = SMALL["train_size"] // SMALL["batch_size"]
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="non-finite model state") as caught:
        training.train(config, str(out), progress=False)
    assert caught.value.rule == "non-finite model state" and not caught.value.step_refused
    assert caught.value.what == "stages.0.blocks.0.bn1.running_var" and caught.value.record["epoch"] == 2
    assert "the epoch was not kept" == caught.value.outcome()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["divergence"]["rule"] == "non-finite model state" and len(metrics["epochs"]) == 1
    _assert_kept_checkpoint_is_usable(out, expected_epoch=0)


def _assert_kept_checkpoint_is_usable(out, expected_epoch):
    """Every tensor of the kept checkpoint finite and the model it holds evaluating to finite outputs."""
    state = checkpoint.load_checkpoint_state(str(out / "checkpoint.pt"), required=("epoch", "model"))
    assert state["epoch"] == expected_epoch
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    model = load_checkpoint(str(out / "checkpoint.pt")).eval()
    with torch.no_grad():
        side, channels = model.config["input_size"], model.config["in_channels"]
        assert torch.isfinite(model(torch.rand(8, channels, side, side))).all()


@pytest.mark.parametrize("provoke", ["nan-loss-epoch-2", "huge-lr"])
def test_a_kept_checkpoint_is_usable_after_any_divergence(tmp_path, provoke):
    out = tmp_path / "run"
    config = config_from("quick", epochs=3, **SMALL)
    steps_per_epoch = SMALL["train_size"] // SMALL["batch_size"]
    task = None
    if provoke == "nan-loss-epoch-2":
        task = _task_that_diverges_at(steps_per_epoch + 2, config)
    else:
        config = config_from("quick", epochs=3, lr=1e6, **SMALL)
    with pytest.raises(TrainingDiverged):
        training.train(config, str(out), progress=False, task=task)
    if (out / "checkpoint.pt").exists():
        _assert_kept_checkpoint_is_usable(out, expected_epoch=0)


def test_the_diverging_run_of_a_new_user_stops_at_epoch_1_and_keeps_nothing_broken(tmp_path):
    """`train --blocks 2 --width 8 --epochs 2 --train-size 512 --test-size 128 --lr 1e6` once finished epoch 1
    with a finite loss of 1e27 and infinite BatchNorm buffers in its checkpoint."""
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--blocks",
            "2",
            "--width",
            "8",
            "--epochs",
            "2",
            "--train-size",
            "512",
            "--test-size",
            "128",
            "--lr",
            "1e6",
            "--no-progress",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == EXIT_DIVERGED, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["divergence"]["epoch"] == 1 and metrics["divergence"]["rule"] in TrainingDiverged.STEP_RULES
    assert metrics["divergence"]["rule"] in result.output and "no step was taken" in result.output
    assert not (out / "checkpoint.pt").exists()


def test_an_infinite_gradient_takes_no_step():
    model, task, opt, sched, step = _step_fixture()
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    handle = model.stages[0].blocks[0].conv1.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(TrainingDiverged, match="non-finite gradient norm"):
        step(x, y, 0)
    handle.remove()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert sched.last_epoch == 0


def test_divergence_keeps_the_last_good_checkpoint_and_says_so(tmp_path):
    config = config_from("quick", epochs=3, **SMALL)
    out = tmp_path / "run"
    steps_per_epoch = SMALL["train_size"] // SMALL["batch_size"]
    with pytest.raises(TrainingDiverged) as caught:
        training.train(config, str(out), progress=False, task=_task_that_diverges_at(steps_per_epoch + 2, config))
    assert caught.value.record["epoch"] == 2 and caught.value.record["step"] == steps_per_epoch + 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and len(metrics["epochs"]) == 1
    assert {"epoch", "step", "lr", "what", "value"} <= set(metrics["divergence"])
    assert metrics["divergence"]["value"] == "nan"  # the JSON itself holds no NaN
    state = checkpoint.load_checkpoint_state(str(out / "checkpoint.pt"), required=("epoch",))
    assert state["epoch"] == 0 and all(
        torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
    )

    with pytest.raises(training.RunDivergedError, match="--restart-diverged"):
        training.train(config, str(out), resume=True, progress=False)
    lower = config_from("quick", epochs=3, lr=0.1, **SMALL)
    resumed = training.train(lower, str(out), resume=True, progress=False, restart_diverged=True)
    assert resumed["status"] == "ok" and [e["epoch"] for e in resumed["epochs"]] == [1, 2, 3]
    assert resumed["epochs"][0] == metrics["epochs"][0]  # the good epoch is kept, not retrained
    assert resumed["restarts"][0]["diverged"]["epoch"] == 2 and resumed["restarts"][0]["lr"] == 0.1
    with pytest.raises(ValueError, match="differs in \\['width'\\]"):  # a finished run: nothing may change
        training.train(config_from("quick", epochs=3, lr=0.1, **{**SMALL, "width": 8}), str(out), resume=True)


def test_cli_divergence_exit_code_and_message(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--lr", "1e6", "--epochs", "2", "--out", str(out)] + FLAGS)
    assert result.exit_code == EXIT_DIVERGED == 3, result.output
    lines = [line for line in result.output.splitlines() if "diverged" in line]
    assert len(lines) == 1 and "epoch 1" in lines[0] and "lr" in lines[0] and "no step was taken" in lines[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["divergence"]["epoch"] == 1
    assert not (out / "checkpoint.pt").exists()  # no epoch finished: nothing good to keep, nothing bad written
    again = CliRunner().invoke(main, ["train", "--lr", "1e6", "--epochs", "2", "--out", str(out), "--resume"] + FLAGS)
    assert again.exit_code == 2 and "--restart-diverged" in again.output and "diverged" in again.output
    alone = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "x"), "--restart-diverged"] + FLAGS)
    assert alone.exit_code == 2 and "goes with --resume" in alone.output


def test_indices_of_a_network_with_non_finite_outputs_is_a_clear_error(tmp_path):
    from itconv_fast import compute_indices
    from itconv_fast.measures.indices import NonFiniteOutputsError

    model = IterResNet(num_classes=3, in_channels=1, width=2, blocks=2, stages=1, input_size=4)
    with torch.no_grad():
        model.head[-1].weight.fill_(float("nan"))
    data = (torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    for method in ("cached", "reference"):
        with pytest.raises(NonFiniteOutputsError, match="not finite.*6 of 6"):
            compute_indices(model, data, extra_iterations=2, method=method)
    # Through the CLI: a one-line error, no indices.json.
    out = tmp_path / "run"
    assert (
        CliRunner()
        .invoke(
            main,
            ["train", "--epochs", "1", "--out", str(out)]
            + FLAGS[:2]
            + ["--test-size", "32", "--width", "4", "--blocks", "2", "--train-size", "64", "--no-progress"],
        )
        .exit_code
        == 0
    )
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["model"]["head.4.weight"].fill_(float("nan"))
    torch.save(state, out / "checkpoint.pt")
    result = CliRunner().invoke(main, ["indices", str(out), "--extra-iterations", "2"])
    assert result.exit_code == 1 and "not finite" in result.output and "Traceback" not in result.output
    assert not (out / "indices.json").exists()


def test_json_files_never_hold_nan(tmp_path):
    path = tmp_path / "x.json"
    checkpoint.atomic_write_json(str(path), {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": None}}
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


# ---------------------------------------------------------------------------------------------------------
# 2. Sweeps with diverged and failed trials (unit level; the Ray run is below)


def _sweep(tmp_path, grid):
    spec = sweeps.parse_sweep(
        {"base": {**SMALL, "epochs": 1}, "grid": grid, "indices": {"extra_iterations": 2}}, "s.yaml"
    )
    out = tmp_path / "sweep"
    sweeps.check_out_dir(spec, str(out))
    return spec, out


def test_a_diverged_trial_is_a_result_and_is_not_retried_unless_asked(tmp_path):
    spec, out = _sweep(tmp_path, {"lr": [0.2, 1e6], "train_size": [2048]})
    for trial in sweeps.expand(spec):
        sweeps.run_trial(trial.config, sweeps.trial_dir(str(out), trial), spec.indices)
    good, bad = sweeps.expand(spec)
    assert sweeps.trial_status(str(out), good) == "ok" and sweeps.trial_status(str(out), bad) == "diverged"
    assert sweeps.pending(spec, str(out)) == []
    assert [t.name for t in sweeps.pending(spec, str(out), retry_diverged=True)] == [bad.name]
    rows = sweeps.collect_results(spec, str(out))
    assert [r["status"] for r in rows] == ["ok", "diverged"]
    assert "non-finite" in rows[1]["reason"] or "exploding loss" in rows[1]["reason"]  # the rule that stopped it
    with open(out / "results.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok", "diverged"]
    md = open(reports.write_report(str(out))).read()
    assert "1 more diverged or failed" in md and "## Diverged and failed trials" in md
    assert "| 1 diverged |" in md or "1 diverged" in md


def test_report_means_leave_out_failed_trials_and_count_them(tmp_path):
    spec, out = _sweep(tmp_path, {"seed": [0, 1, 2]})
    for i, trial in enumerate(sweeps.expand(spec)):
        folder = out / "trials" / trial.name
        folder.mkdir(parents=True)
        row = (
            {"status": "failed", "reason": "RuntimeError: boom"}
            if i == 2
            else {
                "status": "ok",
                "final_test_error": 0.1 * (i + 1),
                "final_train_error": 0.0,
                "final_test_loss": 1.0,
                "chance_error": 0.99,
                "epochs_run": 1,
                "ci": 0.5,
                "ri": 0.5,
                "di": 0.5,
                "ci_s1": 0.5,
                "ri_s1": 0.5,
                "di_s1": 0.5,
                "train_seconds": 1.0,
            }
        )
        import dataclasses

        (folder / "result.json").write_text(json.dumps({"config": dataclasses.asdict(trial.config), "result": row}))
    sweeps.collect_results(spec, str(out))
    md = open(reports.write_report(str(out))).read()
    group = [line for line in md.splitlines() if line.startswith("| all trials |")][0]
    cells = [c.strip() for c in group.strip("|").split("|")]
    assert cells[1] == "2" and cells[2] == "0.1500 ± 0.0707" and cells[-1] == "1 failed"
    assert "RuntimeError: boom" in md
    assert sweeps.pending(spec, str(out)) == [sweeps.expand(spec)[2]]  # a failed trial runs again


# ---------------------------------------------------------------------------------------------------------
# 3. One driver per sweep directory


def test_a_live_driver_holds_the_directory_and_a_dead_ones_lock_is_taken_over(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "started": "now"}))
        with pytest.raises(SweepLocked, match=f"pid {live.pid} on this host"):
            with sweep_lock(str(out)):
                pass
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == live.pid  # untouched
    finally:
        live.kill()
        live.wait()
    with sweep_lock(str(out)):  # its holder is gone: taken over
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()  # released
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(SweepLocked, match="host elsewhere.*remove"):
        with sweep_lock(str(out)):
            pass


def test_cli_refuses_a_sweep_directory_held_by_a_live_driver(tmp_path):
    pytest.importorskip("ray.tune")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": {**SMALL, "epochs": 1}, "grid": {"seed": [0]}}))
    out = tmp_path / "sweep"
    spec = sweeps.load_sweep(str(path))
    sweeps.check_out_dir(spec, str(out))
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    result = CliRunner().invoke(main, ["sweep", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and f"pid {os.getpid()}" in result.output and socket.gethostname() not in "elsewhere"
    assert not (out / "trials").exists()


# ---------------------------------------------------------------------------------------------------------
# 4. Writes that fail half-way


class _HalfThenFull:
    """A file that writes half of what it is given once `budget` bytes are spent, then raises ENOSPC."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, data):
        if len(data) > self.budget:
            self.f.write(data[: max(1, len(data) // 2)])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


@pytest.fixture
def full_disk(monkeypatch):
    """Every atomic write inside `with full_disk():` fails half-way with ENOSPC."""
    import contextlib

    real = os.fdopen

    @contextlib.contextmanager
    def active(budget=64):
        monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: _HalfThenFull(real(fd, mode), budget))
        try:
            yield
        finally:
            monkeypatch.setattr(checkpoint.os, "fdopen", real)

    return active


@pytest.mark.parametrize(
    "name,write",
    [
        ("metrics.json", lambda p: checkpoint.atomic_write_json(p, {"epochs": list(range(1000))})),
        ("checkpoint.pt", lambda p: checkpoint.atomic_save({"w": torch.randn(10_000)}, p)),
        ("results.csv", lambda p: checkpoint.atomic_write_text(p, "x," * 10_000)),
    ],
)
def test_a_failed_write_keeps_the_previous_file(tmp_path, full_disk, name, write):
    path = str(tmp_path / name)
    write(path)
    before = open(path, "rb").read()
    with full_disk():
        with pytest.raises(OSError) as caught:
            write(path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == path
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == [name]  # no temporary file left behind


def test_train_on_a_full_disk_keeps_the_last_checkpoint_and_says_so_in_one_line(tmp_path, full_disk):
    out = tmp_path / "run"
    args = [
        "train",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--train-size",
        "64",
        "--test-size",
        "32",
        "--width",
        "4",
        "--blocks",
        "2",
        "--no-progress",
    ]
    training.train(
        config_from("quick", epochs=2, train_size=64, test_size=32, width=4, blocks=2),
        str(out),
        progress=False,
        stop_after_epochs=1,
    )
    saved = (out / "checkpoint.pt").read_bytes()
    metrics = (out / "metrics.json").read_bytes()
    with full_disk():
        result = CliRunner().invoke(main, args + ["--resume"])
    assert result.exit_code == 1 and "No space left on device" in result.output and "Traceback" not in result.output
    assert "previous files are kept" in result.output
    assert (out / "checkpoint.pt").read_bytes() == saved and (out / "metrics.json").read_bytes() == metrics
    assert load_checkpoint(str(out / "checkpoint.pt")) is not None


def test_sweep_results_and_report_on_a_full_disk(tmp_path, full_disk):
    spec, out = _sweep(tmp_path, {"seed": [0]})
    trial = sweeps.expand(spec)[0]
    sweeps.run_trial(trial.config, sweeps.trial_dir(str(out), trial), spec.indices)
    sweeps.collect_results(spec, str(out))
    report = reports.write_report(str(out))
    kept = {p: open(p, "rb").read() for p in (str(out / "results.csv"), report)}
    with full_disk(budget=16):
        with pytest.raises(OSError, match="No space left"):
            sweeps.collect_results(spec, str(out))
        result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 1 and "No space left on device" in result.output and "Traceback" not in result.output
    assert {p: open(p, "rb").read() for p in kept} == kept


# ---------------------------------------------------------------------------------------------------------
# 2 and 3 on a real local Ray instance


@pytest.mark.slow
def test_sweep_with_a_diverging_and_a_crashing_trial_on_ray(tmp_path):
    """Three trials on a real local Ray instance: one fine, one that diverges through its lr, one that crashes
    (its data directory has no files). The fine one finishes; the diverged one is a result; the crashed one is
    `failed` with its reason after Ray's retries, and the sweep exits 1 naming it. A second driver is refused
    while the first holds the directory; the rerun retries only the crashed trial."""
    pytest.importorskip("ray.tune")
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": {**SMALL, "epochs": 1, "train_size": 2048},
                "grid": [{"lr": [0.2, 1e6]}, {"dataset": ["mnist"], "data_dir": [str(tmp_path)]}],
                "indices": {"extra_iterations": 2},
            }
        )
    )
    out = tmp_path / "sweep"
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    cmd = [
        sys.executable,
        "-m",
        "itconv_fast.cli.app",
        "sweep",
        str(path),
        "--out",
        str(out),
        "--cpus-per-run",
        "2",
        "--quiet",
    ]
    first = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / LOCK_NAME).exists() and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr[-2000:]
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 1 and "1 trial(s) failed" in stderr, stdout[-2000:] + stderr[-2000:]
    with open(out / "results.csv", newline="") as f:
        rows = {r["trial"]: r for r in csv.DictReader(f)}
    assert rows["lr=0.2"]["status"] == "ok" and rows["lr=0.2"]["final_test_error"] != ""
    assert rows["lr=1e+06"]["status"] == "diverged"
    assert "non-finite" in rows["lr=1e+06"]["reason"] or "exploding loss" in rows["lr=1e+06"]["reason"]
    crashed = [r for r in rows.values() if r["dataset"] == "mnist"]
    assert crashed and crashed[0]["status"] == "failed" and "DatasetFilesError" in crashed[0]["reason"]
    assert not (out / LOCK_NAME).exists()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert "3 trials, 2 already finished, running 1" in rerun.stdout, rerun.stdout[-2000:] + rerun.stderr[-2000:]


@pytest.mark.slow
def test_a_killed_drivers_lock_is_taken_over_on_ray(tmp_path):
    pytest.importorskip("ray.tune")
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump({"base": {**SMALL, "epochs": 1}, "grid": {"seed": [0]}, "indices": {"extra_iterations": 2}})
    )
    out = tmp_path / "sweep"
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    cmd = [sys.executable, "-m", "itconv_fast.cli.app", "sweep", str(path), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / LOCK_NAME).exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid  # left behind by the killed driver
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert not (out / LOCK_NAME).exists()
