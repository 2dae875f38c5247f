"""Training: the CLI end to end, outputs, resume after interruption, bad options."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from itconv_fast.cli.app import main
from itconv_fast.experiments import training
from itconv_fast.models import load_checkpoint

TINY = [
    "--train-size",
    "96",
    "--test-size",
    "32",
    "--width",
    "4",
    "--blocks",
    "2",
    "--batch-size",
    "32",
    "--no-progress",
]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ITCONV_FAST_CACHE", str(tmp_path / "cache"))


def test_cli_trains_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["train", "--lam", "0.5", "--sn-mu", "0.95", "--epochs", "2", "--out", str(out)] + TINY
    )
    assert result.exit_code == 0, result.output
    assert "done: 2 epochs" in result.output and "test error" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"config", "environment", "epochs"} <= set(metrics)
    assert metrics["config"]["lam"] == 0.5 and metrics["config"]["sn_mu"] == 0.95
    assert metrics["environment"]["extension_backend"] in ("compiled", "reference")
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for key in ("epoch", "train_loss", "train_error", "test_error", "lr", "seconds", "train_seconds"):
        assert key in metrics["epochs"][0]
    model = load_checkpoint(str(out / "checkpoint.pt"))
    assert model.stages[0].sn is not None and len(model.stages[0].blocks) == 2
    # Coupled training starts recurrent (the paper): recorded in the model's config.
    assert model.config["init"] == "recurrent"


@pytest.mark.parametrize(
    "args,match",
    [
        (["--lam", "2"], "--lam"),
        (["--sn-mu", "0"], "--sn-mu"),
        (["--dataset", "imagenet"], "--dataset"),
        (["--dataset", "mnist"], "--data-dir"),
        (["--skip-first", "5"], "--skip-first"),
    ],
)
def test_bad_options_are_usage_errors_and_write_nothing(tmp_path, args, match):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--out", str(out)] + args + TINY)
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert not out.exists()


def test_data_dir_without_files_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "empty"), "--out", str(out)] + TINY
    )
    assert result.exit_code == 2 and "cifar-10-python.tar.gz" in result.output and "--download" in result.output
    assert not out.exists()


def _config(**kw):
    args = dict(train_size=96, test_size=32, width=4, blocks=2, batch_size=32, epochs=3, lam=0.5, sn_mu=0.9)
    args.update(kw)
    return training.config_from("quick", **args)


def test_resume_reaches_the_same_state_as_an_uninterrupted_run(tmp_path):
    full = training.train(_config(), str(tmp_path / "full"), progress=False)
    part = training.train(_config(), str(tmp_path / "part"), progress=False, stop_after_epochs=1)
    assert len(part["epochs"]) == 1
    resumed = training.train(_config(), str(tmp_path / "part"), resume=True, progress=False)
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2, 3]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [e["test_error"] for e in full["epochs"]] == [e["test_error"] for e in resumed["epochs"]]


def test_resume_refuses_a_different_configuration(tmp_path):
    training.train(_config(), str(tmp_path / "run"), progress=False, stop_after_epochs=1)
    with pytest.raises(ValueError, match="differs"):
        training.train(_config(lr=0.5), str(tmp_path / "run"), resume=True, progress=False)


@pytest.mark.slow
def test_killed_run_resumes_without_losing_finished_epochs(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, ITCONV_FAST_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "itconv_fast.cli.app", "train", "--epochs", "30", "--out", str(out)] + TINY
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and len(json.loads(metrics.read_text())["epochs"]) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(json.loads(metrics.read_text())["epochs"])
    assert finished >= 2
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # intact despite the kill
    assert ckpt["epoch"] + 1 >= finished
    result = subprocess.run(cmd + ["--resume", "--epochs", "30"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    epochs = json.loads(metrics.read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, 31))


def test_cli_indices_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(main, ["train", "--epochs", "1", "--out", str(out)] + TINY).exit_code == 0
    plot = tmp_path / "fig.png"
    result = CliRunner().invoke(main, ["indices", str(out), "--extra-iterations", "3", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "indices.json").read_text())
    assert {"ci", "ri", "di", "error", "chance_error", "n", "stages"} <= set(report)
    assert report["n"] == 32 and len(report["stages"]) == 3 and len(report["stages"][0]["e_div"]) == 3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "stage" in result.output and "CI" in result.output
    bad = CliRunner().invoke(main, ["indices", str(tmp_path)])
    assert bad.exit_code == 2


def _ddp_config(**kw):
    return _config(device="cpu", epochs=2, sn_mu=None, lr=0.05, **kw)


def _ddp_worker(rank, world, port, out, cache):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        ITCONV_FAST_CACHE=cache,
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        _, model = training.train(_ddp_config(), out, progress=False, return_model=True)
        torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears gloo down (a rare SIGABRT at exit otherwise)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cache = str(tmp_path / "cache")
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp"), cache), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in range(2))
    params = [k for k in r0 if "running" not in k and "num_batches" not in k and ".sn." not in k]
    for k in params:
        assert torch.equal(r0[k], r1[k]), k  # every rank ends with identical parameters
    # One process, two accumulation steps: the same examples per step, the same per-micro-batch BN statistics.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same conv algorithms, so rounding matches closely
    try:
        _, single = training.train(
            _ddp_config(accumulate=2), str(tmp_path / "single"), progress=False, return_model=True
        )
    finally:
        torch.set_num_threads(threads)
    s = single.state_dict()
    for k in params:
        torch.testing.assert_close(r0[k], s[k], rtol=1e-4, atol=1e-5)


def test_only_rank_0_reports_under_torchrun(tmp_path, monkeypatch):
    """torchrun sets RANK in every process; the command's "training ..." and "done: ... wrote" lines come from rank
    0 alone (the files are written by rank 0 alone too)."""
    from click.testing import CliRunner

    from itconv_fast.cli.app import main

    monkeypatch.setenv("ITCONV_FAST_CACHE", str(tmp_path / "cache"))
    tiny = ["--train-size", "64", "--test-size", "32", "--width", "2", "--blocks", "1", "--batch-size", "32"]
    tiny += ["--epochs", "1", "--no-progress", "--compile", "off"]
    for rank, reports in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)  # (WORLD_SIZE unset: one process, only the reporting rule differs)
        result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / f"run{rank}")] + tiny)
        assert result.exit_code == 0, result.output
        assert ("wrote" in result.output) is reports and ("training" in result.output) is reports
