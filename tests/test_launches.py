"""Kernel launches of a training step on the CUDA path, counted on the CPU: the counter itself, and the budgets that
a change may not break (itconv_fast.bench.launches)."""

import pytest
import torch

from itconv_fast.bench.launch_counter import LaunchCounter
from itconv_fast.bench.launches import (
    LAUNCH_CEILINGS,
    LAUNCH_GOALS,
    PLAIN_LOOP,
    TRAIN_CASES,
    count_step,
    launch_cases,
    run_launch_count,
)


def test_counter_counts_kernels_not_views_and_reads_apart():
    x = torch.randn(4, 3)
    with LaunchCounter() as counter:
        y = x.t().reshape(3, 4).unsqueeze(0).expand(2, 3, 4)  # views: nothing launched
        z = torch.empty(5)  # an allocation that writes nothing
        w = (y * 2).sum()  # two kernels
        value = w.item()  # a read of the device
    assert counter.launches == 2 and counter.syncs == 1
    assert counter.by_op == {"aten::mul.Tensor": 1, "aten::sum.default": 1}
    assert z.shape == (5,) and value == pytest.approx(float(x.sum() * 4), rel=1e-5)  # two copies, doubled


def test_a_foreach_op_is_one_launch_on_its_fast_route_and_one_a_tensor_off_it():
    same = [torch.zeros(3), torch.zeros(4)]
    mixed = [torch.zeros(3), torch.zeros(4, dtype=torch.int64)]
    with LaunchCounter() as counter:
        torch._foreach_add_(same, 1)
    assert counter.launches == 1
    with LaunchCounter() as counter:
        torch._foreach_copy_(mixed, [t.clone() for t in mixed])
    assert counter.by_op["aten::_foreach_copy_.default"] == 2 and counter.by_op["aten::clone.default"] == 2


@pytest.fixture(scope="module")
def counts():
    report, table = run_launch_count()
    assert "plain loop" in table and "goal" in table
    return {row["case"]: row for row in report["rows"]}, report["goals"]


def test_no_change_adds_launches(counts):
    rows, _ = counts
    assert set(rows) == {PLAIN_LOOP, *TRAIN_CASES}
    for case, ceiling in LAUNCH_CEILINGS.items():
        assert rows[case]["launches"] <= ceiling, (case, rows[case]["launches"], ceiling)


def test_the_goals_met_stay_met(counts):
    rows, goals = counts
    # Coupling is one fused op: one launch on top of the uncoupled step, with or without spectral normalization.
    assert rows["train lam 0.5"]["launches"] - rows["train lam 0"]["launches"] <= LAUNCH_GOALS["train lam 0.5"][1]
    assert goals["train lam 0.5"]["met"] and goals["train lam 0.5 + mu 0.95"]["met"]
    assert rows["train lam 0.5"]["by_op"]["itconv_fast::soft_couple_.default"] == 1


def test_train_reads_the_device_once_a_step_and_the_plain_loop_twice(counts):
    rows, _ = counts
    assert rows[PLAIN_LOOP]["syncs"] == 2
    for case in ("train lam 0", "train lam 0.5", "train mu 0.95 (operator)", "train lam 0.5 + mu 0.95"):
        assert rows[case]["syncs"] == 1, case


def test_the_counted_step_is_the_cuda_path(counts):
    rows, _ = counts
    train = rows["train lam 0"]["by_op"]
    # cuDNN's BatchNorm and ATen's ReLU (our fused kernel serves the CPU only), SGD's fused kernel, and the running
    # statistics kept by one fused copy per dtype; the plain loop's SGD is foreach, its default on CUDA.
    assert "itconv_fast::batch_norm_relu.default" not in train and train["aten::native_batch_norm.default"] == 27
    assert train["aten::_fused_sgd_.default"] == 1 and train["aten::_foreach_copy_.default"] == 2
    assert "aten::_fused_sgd_.default" not in rows[PLAIN_LOOP]["by_op"]
    assert rows[PLAIN_LOOP]["by_op"]["aten::_foreach_add_.List"] == 2


def test_count_step_warms_up_and_cases_are_named():
    calls = []
    count = count_step(lambda: calls.append(torch.ones(2).sum()), warmup=3)
    assert len(calls) == 4 and count.launches == 2 and count.syncs == 0
    with pytest.raises(ValueError, match="unknown case"):
        launch_cases(["train lam 7"])


def test_cli_bench_launches_one_case(tmp_path):
    import json

    from click.testing import CliRunner

    from itconv_fast.cli.app import main

    out = tmp_path / "launches.json"
    result = CliRunner().invoke(main, ["bench", "launches", "--case", "plain loop", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["rows"][0]["launches"] <= LAUNCH_CEILINGS[PLAIN_LOOP]
    bad = CliRunner().invoke(main, ["bench", "launches", "--case", "nope"])
    assert bad.exit_code == 2 and "unknown case" in bad.output


def test_profiled_launches_reads_kernels_launch_calls_and_copies_from_profiler_events():
    """The device half of the check (`make gpu-check` runs profile_launch_counts on a GPU): what it reads from
    torch.profiler's events, here on events shaped like the profiler's."""
    from types import SimpleNamespace

    from itconv_fast.bench.launches import profiled_launches

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [
        SimpleNamespace(name="aten::conv2d", device_type=cpu),
        SimpleNamespace(name="cudaLaunchKernel", device_type=cpu),
        SimpleNamespace(name="cudaLaunchKernelExC", device_type=cpu),
        SimpleNamespace(name="void cudnn::conv_kernel<...>", device_type=cuda),
        SimpleNamespace(name="void at::native::elementwise_kernel<...>", device_type=cuda),
        SimpleNamespace(name="cudaMemcpyAsync", device_type=cpu),
        SimpleNamespace(name="cudaMemsetAsync", device_type=cpu),
    ]
    assert profiled_launches(events) == {"kernels": 2, "launch_calls": 2, "memory_calls": 2}


def test_the_cases_build_for_a_device_by_name():
    cases = launch_cases(["plain loop", "train lam 0"], device="cpu")
    assert list(cases) == ["plain loop", "train lam 0"]
    assert count_step(cases["train lam 0"]).launches <= LAUNCH_CEILINGS["train lam 0"]
