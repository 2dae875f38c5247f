"""What makes training fast without changing what is trained: --compile auto and its break-even rule, the shared
compile cache, channels-last stages on the CPU, the batched spectral-norm path, train_epochs, and `itconv-fast bench
train`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from itconv_fast.cli.app import main
from itconv_fast.experiments import compilation
from itconv_fast.experiments.config import ConfigError, TrainConfig, build_config
from itconv_fast.experiments.training import train, train_epochs
from itconv_fast.models import IterResNet

CPU = torch.device("cpu")


def tiny_config(**values) -> TrainConfig:
    return build_config(
        "quick",
        {
            "width": 4,
            "blocks": 2,
            "train_size": 256,
            "test_size": 64,
            "epochs": 2,
            "batch_size": 64,
            "device": "cpu",
            **values,
        },
    )


@pytest.mark.parametrize(
    "given, expected", [(True, True), (False, False), ("auto", "auto"), ("on", True), ("off", False)]
)
def test_compile_setting_accepts_true_false_auto(given, expected):
    assert TrainConfig(compile=given).compile == expected


@pytest.mark.parametrize("bad", ["yes", 1, None, "Auto"])
def test_compile_setting_refuses_anything_else(bad):
    with pytest.raises(ConfigError, match="compile: must be true, false or auto"):
        TrainConfig(compile=bad)


def test_auto_compiles_from_the_break_even_step_count():
    threshold = compilation.BREAK_EVEN_STEPS["cuda"]
    cuda = torch.device("cuda")
    assert compilation.decide_compile("auto", cuda, threshold)[0] is True
    on, why = compilation.decide_compile("auto", cuda, threshold - 1)
    assert on is False and str(threshold) in why
    assert compilation.compile_mode(cuda) == "reduce-overhead" and compilation.compile_mode(CPU) == "default"
    # Measured not to pay on the CPU: auto never compiles there, however long the run.
    on, why = compilation.decide_compile("auto", CPU, 10**9)
    assert on is False and "does not pay" in why
    assert compilation.decide_compile("auto", torch.device("meta"), 10**9)[0] is False  # nothing measured there


def test_auto_stays_off_where_compiled_runs_were_not_measured_and_explicit_settings_win():
    many, cuda = 10**9, torch.device("cuda")
    assert compilation.decide_compile("auto", cuda, many, objectives=True)[0] is False
    assert compilation.decide_compile("auto", cuda, many, distributed=True)[0] is False
    assert compilation.decide_compile(True, CPU, 1, objectives=True) == (True, "on (asked for)")
    assert compilation.decide_compile(False, CPU, many) == (False, "off (asked for)")


def test_compile_cache_is_one_directory_and_the_users_choice_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(compilation, "_USER_CACHE_DIR", None)
    monkeypatch.setenv("ITCONV_FAST_CACHE", str(tmp_path / "cache"))
    assert compilation.compile_cache_dir() == str(tmp_path / "cache" / "inductor")
    assert compilation.sweep_compile_cache_dir(str(tmp_path / "sweep")) == str(tmp_path / "sweep" / "compile-cache")
    chosen = compilation.use_compile_cache(str(tmp_path / "shared"))
    assert chosen == str(tmp_path / "shared") and os.path.isdir(chosen)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == chosen
    monkeypatch.setattr(compilation, "_USER_CACHE_DIR", str(tmp_path / "mine"))
    assert compilation.compile_cache_dir() == str(tmp_path / "mine")
    assert compilation.sweep_compile_cache_dir(str(tmp_path / "sweep")) == str(tmp_path / "mine")


@pytest.mark.parametrize(
    "args, expected",
    [(["--compile"], "on"), (["--compile", "auto"], "auto"), (["--compile", "off"], "off"), ([], None)],
)
def test_the_compile_option_parses_bare_and_with_a_value(args, expected):
    from itconv_fast.cli.train import train as train_command

    assert train_command.make_context("train", list(args)).params["compile_"] == expected


def test_no_compile_on_the_command_line_is_recorded_as_off(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--no-compile",
            "--width",
            "4",
            "--blocks",
            "1",
            "--train-size",
            "128",
            "--test-size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "metrics.json").read_text())["compile"]
    assert recorded["setting"] is False and recorded["on"] is False and recorded["reason"] == "off (asked for)"


def test_a_run_records_its_compile_decision(tmp_path):
    metrics = train(tiny_config(epochs=1), str(tmp_path / "run"), progress=False)
    assert metrics["compile"]["setting"] == "auto" and metrics["compile"]["on"] is False
    assert "does not pay on cpu" in metrics["compile"]["reason"]
    assert 0 < metrics["epochs"][0]["train_seconds"] <= metrics["epochs"][0]["seconds"]


def test_resume_accepts_another_compile_setting(tmp_path):
    out = str(tmp_path / "run")
    train(tiny_config(compile=False), out, progress=False, stop_after_epochs=1)
    resumed = train(tiny_config(compile="auto"), out, progress=False, resume=True)
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]


def test_train_epochs_yields_the_records_train_returns(tmp_path):
    records = []
    run = train_epochs(tiny_config(), str(tmp_path / "a"), progress=False)
    while True:
        try:
            records.append(next(run))
        except StopIteration as finished:
            metrics = finished.value
            break
    assert records == metrics["epochs"] and len(records) == 2
    again = train(tiny_config(), str(tmp_path / "b"), progress=False)
    drop = ("seconds", "train_seconds")
    assert [{k: v for k, v in e.items() if k not in drop} for e in again["epochs"]] == [
        {k: v for k, v in e.items() if k not in drop} for e in records
    ]


@pytest.mark.parametrize("sn_mu", [None, 0.5])
@pytest.mark.parametrize("min_width, narrow_convolutions", [(16, True), (16, False), (64, True), (1, True)])
def test_channels_last_stages_compute_the_same_network(sn_mu, min_width, narrow_convolutions):
    torch.manual_seed(0)
    reference = IterResNet(10, 3, width=8, blocks=2, stages=3, sn_mu=sn_mu).train()
    fast = IterResNet(10, 3, width=8, blocks=2, stages=3, sn_mu=sn_mu).train()
    fast.load_state_dict(reference.state_dict())
    fast.to_channels_last(min_width=min_width, narrow_convolutions=narrow_convolutions)
    cl = torch.channels_last
    for s, width in enumerate((8, 16, 32)):
        stage, conv = fast.stages[s], fast.stages[s].blocks[0].conv1.weight
        if width >= min_width:  # a channels-last stage
            assert stage.memory_format == cl and conv.is_contiguous(memory_format=cl)
            assert stage.blocks[-1].conv2.weight.is_contiguous(memory_format=cl)
            assert not stage.blocks[0].nhwc_convs  # NHWC activations already: nothing to convert
        else:  # a narrow one: NCHW activations; NHWC convolutions when asked
            assert stage.memory_format == torch.contiguous_format
            assert stage.blocks[0].nhwc_convs == narrow_convolutions
            assert conv.is_contiguous(memory_format=cl if narrow_convolutions else torch.contiguous_format)
    if min_width == 16:  # the transition out of the narrow stage: BN NCHW, its convolution NHWC
        assert fast.transitions[0].nhwc_conv and fast.transitions[0].conv.weight.is_contiguous(memory_format=cl)
        assert fast.transitions[1].conv.weight.is_contiguous(memory_format=cl) and not fast.transitions[1].nhwc_conv
    x = torch.randn(4, 3, 32, 32)
    out_ref, out_fast = reference(x), fast(x)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-5)
    out_ref.square().sum().backward()
    out_fast.square().sum().backward()
    for (name, p), q in zip(reference.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
    for (name, b), c in zip(reference.named_buffers(), fast.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5, msg=name)


def test_stage_forward_equals_blocks_applied_one_by_one_bit_for_bit():
    """The stage divides the stacked conv2 kernels by the corrections once; block.residual divides each kernel:
    the same numbers, and the batched power step of both conv slots equals two separate ones."""
    torch.manual_seed(0)
    model = IterResNet(10, 1, width=8, blocks=3, stages=1, sn_mu=0.5).eval()
    stage = model.stages[0]
    z = torch.randn(2, 8, 32, 32)
    expected = z
    for block in stage.blocks:
        expected = expected + block.residual(expected)
    assert torch.equal(stage(z), expected)
    c_batched = stage.sn.bounds(*stage.spectral_weights(), update=False)
    conv1, conv2, d1, d2 = stage.spectral_weights()
    from itconv_fast.models.stage_spectral_norm import fold_batchnorm

    separate = stage.sn._sigma(fold_batchnorm(conv1, d1, d2), stage.sn.u1, 1, False) * stage.sn._sigma(
        conv2, stage.sn.u2, 1, False
    )
    assert torch.equal(c_batched, separate)


def test_bench_train_without_compiled_runs_writes_the_bench_schema(tmp_path):
    out = tmp_path / "train.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "train",
            "--size",
            "quick",
            "--quick-train-size",
            "256",
            "--epochs",
            "2",
            "--no-compile",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["benchmark"] == "train" and {"cpu", "torch", "date"} <= set(report["machine"])
    cases = {row["case"] for row in report["rows"]}
    assert cases == {"plain loop (eager)", "train lam 0 (eager)", "train lam 0.5 + mu 0.95 (eager)"}
    for row in report["rows"]:
        assert row["steps_per_epoch"] == 2 and len(row["epoch_s"]) == 2 and row["median_epoch_s"] > 0
    assert "overhead of coupling + spectral norm (eager)" in report["ratios"]["quick"]
    paired = report["paired_ratios"]["quick"]
    assert set(paired) == {
        "train lam 0 (eager)",
        "train lam 0.5 + mu 0.95 (eager)",
        "overhead of coupling + spectral norm (eager)",
    }
    times = {row["case"]: row["epoch_s"][1:] for row in report["rows"]}  # one timed round: paired = that ratio
    regularised, plain = times["train lam 0.5 + mu 0.95 (eager)"][0], times["plain loop (eager)"][0]
    assert paired["train lam 0.5 + mu 0.95 (eager)"] == pytest.approx(regularised / plain)
    assert "plain loop (eager)" in result.output and "paired" in result.output


@pytest.mark.slow
def test_compiled_and_eager_runs_give_the_same_metrics(tmp_path):
    """--compile on trains the same network as eager, to float tolerance (Inductor reorders float sums)."""
    values = dict(lam=0.5, sn_mu=0.95, epochs=2)
    eager = train(tiny_config(compile=False, **values), str(tmp_path / "eager"), progress=False)
    compiled = train(tiny_config(compile=True, **values), str(tmp_path / "compiled"), progress=False)
    assert compiled["compile"]["on"] is True
    for e, c in zip(eager["epochs"], compiled["epochs"]):
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-3, abs=1e-4)
        assert c["test_loss"] == pytest.approx(e["test_loss"], rel=1e-3, abs=1e-4)
        assert abs(c["test_error"] - e["test_error"]) <= 2 / 64  # at most two of 64 test images flip


@pytest.mark.slow
def test_bench_train_with_compiled_runs_derives_the_break_even(tmp_path):
    out = tmp_path / "train.json"
    result = CliRunner().invoke(
        main, ["bench", "train", "--size", "quick", "--quick-train-size", "256", "--epochs", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    ratios = json.loads(out.read_text())["ratios"]["quick"]
    for key in (
        "overhead of coupling + spectral norm (compiled)",
        "compilation seconds (lam 0)",
        "break-even steps (lam 0.5 + mu 0.95)",
    ):
        assert key in ratios


@pytest.mark.parametrize("sn_mode", ["operator", "matrix"])
def test_the_regularised_training_forward_is_one_graph(sn_mode):
    """What CUDA graphs (mode="reduce-overhead") need, checked on the CPU: the training forward with spectral
    normalization (its power step mutating the vectors in place) traces as one graph, without a break or a
    host read of a tensor value; the coupling op runs after backward, outside the compiled region."""
    torch._dynamo.reset()
    model = IterResNet(10, 1, width=4, blocks=2, stages=2, sn_mu=0.95, sn_mode=sn_mode).train()
    explained = torch._dynamo.explain(model)(torch.randn(2, 1, 32, 32))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
