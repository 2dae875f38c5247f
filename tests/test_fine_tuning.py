"""Fine-tuning a model by name on a user's data (`train --model ... --data ...`): the indices before and after equal
the hand computation on the weights it started from and ended with, a killed run resumes to the same weights, a
language model fine-tunes with coupling and spectral normalization, `benefits` measures models by name, and a
script's model is measured again only with its script named."""

import json
import math

import pytest
import torch
from named_fixtures import (
    assert_same_indices,
    hand_batches,
    image_folder,
    invoke,
    language_model,
    timm_case,
    token_windows_by_hand,
    torchvision_case,
)

from itconv_fast import compute_indices, lipschitz_report
from itconv_fast.models.integrations import residual_model
from itconv_fast.models.residual import sequence_error

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


# The fine-tuning runs' flags: the extra-iteration loss at K_train 2, small batches; no progress bars, no compile.
TUNE = ["--objective", "extra-iterations:1", "--objective-k", 2, "--batch-size", 16, "--lr", 0.02]
QUIET = ["--no-progress", "--compile", "off"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning.


def test_fine_tuning_writes_the_indices_before_and_after_and_resumes(folder, tmp_path):
    model, transform, _ = torchvision_case("resnet18", 32)
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    common = [
        "train",
        "--model",
        "torchvision:resnet18",
        "--weights",
        weights,
        "--data",
        f"imagefolder:{folder}",
        "--image-size",
        32,
        *TUNE,
        "--epochs",
        2,
        *QUIET,
    ]
    result = invoke([*common, "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert "indices before: error" in result.output and "indices after: error" in result.output
    # Before: the indices of the weights handed in, on the val split, by hand.
    data = hand_batches(folder / "val", transform)
    before = compute_indices(residual_model(model.eval()), data, extra_iterations=16, chance_error=0.9)
    assert_same_indices(json.loads((run / "indices_before.json").read_text()), before)
    # After: the fine-tuned checkpoint's network, loaded into a fresh torchvision model by hand.
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    tuned = torchvision.models.resnet18(num_classes=10)
    tuned.load_state_dict({k.removeprefix("network."): v for k, v in state.items()})
    after = compute_indices(residual_model(tuned.eval()), data, extra_iterations=16, chance_error=0.9)
    assert_same_indices(json.loads((run / "indices.json").read_text()), after)
    assert not tuned.training  # measuring the stack leaves the model in the mode it was in
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["indices"]["after"]["di"] == (None if math.isnan(after.di) else pytest.approx(after.di))
    with torch.no_grad():
        wrong = sum(int((tuned(x).argmax(1) != y).sum()) for x, y in data)
    assert metrics["epochs"][-1]["test_error"] == pytest.approx(wrong / 20)
    # A killed run resumes from its last epoch and ends where the uninterrupted one did.
    from itconv_fast.experiments.config import build_config
    from itconv_fast.experiments.training import train

    config = build_config("quick", json.loads((run / "metrics.json").read_text())["config"])
    train(config, str(tmp_path / "part"), progress=False, stop_after_epochs=1)
    train(config, str(tmp_path / "part"), progress=False, resume=True)
    resumed = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    for key in state:
        torch.testing.assert_close(resumed[key], state[key], rtol=0, atol=0)
    part = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert part["indices"]["before"] == metrics["indices"]["before"]
    # The measuring commands rebuild the run's model from its checkpoint (and write where --out says).
    result = invoke(["indices", run, "--out", tmp_path / "elsewhere"])
    assert result.exit_code == 0, result.output
    assert_same_indices(json.loads((tmp_path / "elsewhere" / "indices.json").read_text()), after)
    # `lipschitz RUN` measures the fine-tuned network at the run's image size.
    result = invoke(["lipschitz", run, "--power-iterations", 5, "--no-gram", "--json", tmp_path / "l.json"])
    assert result.exit_code == 0, result.output
    by_hand = lipschitz_report(tuned, torch.zeros(1, 3, 32, 32), power_iterations=5, gram=False).to_dict()
    by_hand = json.loads(json.dumps(by_hand))  # as written
    assert json.loads((tmp_path / "l.json").read_text())["layers"] == by_hand["layers"]


@pytest.mark.parametrize("kind", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_fine_tuning_a_language_model_with_coupling_and_spectral_norm(kind, tmp_path):
    directory, text = language_model(tmp_path, kind)
    result = invoke(
        [
            "train",
            "--model",
            f"hf:{directory}",
            "--pretrained",
            "--data",
            f"text:{text}",
            "--seq-len",
            12,
            "--lam",
            0.5,
            "--sn-mu",
            0.9,
            *TUNE,
            "--epochs",
            2,
            *QUIET,
            "--out",
            tmp_path / "run",
        ]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["indices"]) == {"before", "after"}
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    normalised = {k for k in state if ".parametrizations.weight.original" in k}
    assert normalised and all(".h." in k or ".layers." in k for k in normalised)  # the blocks' layers only
    # The next-token error of the last epoch, by hand: the test split is the text's last 20% of windows.
    inputs, targets = token_windows_by_hand(directory, text, 12)
    held = max(1, round(0.2 * len(inputs)))
    result = invoke(["indices", tmp_path / "run", "--extra-iterations", 2])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "indices.json").read_text())["n"] == held
    assert 0 <= metrics["epochs"][-1]["test_error"] <= 1
    # `lipschitz RUN`: the language model's layers on a window of the run's 12 tokens, the normalised ones at mu.
    out = tmp_path / "l.json"
    result = invoke(["lipschitz", tmp_path / "run", "--power-iterations", 30, "--no-gram", "--markdown", "--json", out])
    assert result.exit_code == 0, result.output
    assert "| lm_head |" in result.output
    layers = {r["name"]: r for r in json.loads(out.read_text())["layers"]}
    bounded = [r for r in layers.values() if r["bound"] is not None]
    assert bounded and all(r["bound"] == pytest.approx(0.9) and r["bound_held"] for r in bounded)


def test_benefits_of_models_by_name(folder, tmp_path):
    directory, text = language_model(tmp_path, "gpt2")
    base = [
        "benefits",
        "--model",
        f"hf:{directory}",
        "--pretrained",
        "--data",
        f"text:{text}",
        "--seq-len",
        12,
        "--extra-iterations",
        2,
        "--ks",
        "0,2",
    ]
    result = invoke([*base, "--measures", "thinking-longer", "--noise-sigma", 0, "--out", tmp_path])
    assert result.exit_code == 0, result.output
    assert set(json.loads((tmp_path / "benefits.json").read_text())["thinking_longer"]) == {"test set"}
    refused = invoke([*base, "--measures", "robustness"])
    assert refused.exit_code == 2 and "token ids" in refused.output
    image = invoke(
        [
            "benefits",
            "--model",
            "torchvision:resnet18",
            "--data",
            f"imagefolder:{folder}",
            "--image-size",
            32,
            "--extra-iterations",
            2,
            "--ks",
            "0,2",
            "--pgd-steps",
            2,
            "--epsilons",
            "0.03",
            "--sigmas",
            "0.1",
            "--taus",
            "0.1",
            "--confidences",
            "0.9",
            "--agreements",
            "1",
        ]
    )
    assert image.exit_code == 0, image.output
    assert "noise sigma 0.1" in image.output and "PGD eps 0.03" in image.output


def test_a_script_models_run_is_measured_with_its_script_named_again(folder, tmp_path):
    script = tmp_path / "models.py"
    script.write_text(
        "import torchvision\ndef build(num_classes):\n    return torchvision.models.resnet18(num_classes=num_classes)\n"
    )
    result = invoke(
        [
            "train",
            "--model",
            f"{script}:build",
            "--data",
            f"imagefolder:{folder}",
            "--image-size",
            32,
            "--epochs",
            1,
            "--batch-size",
            16,
            *QUIET,
            "--out",
            tmp_path / "r",
        ]
    )
    assert result.exit_code == 0, result.output
    refused = invoke(["indices", tmp_path / "r"])
    assert refused.exit_code == 2 and "which a checkpoint does not run" in refused.output
    again = invoke(
        [
            "indices",
            "--model",
            f"{script}:build",
            "--weights",
            tmp_path / "r" / "checkpoint.pt",
            "--data",
            f"imagefolder:{folder}",
            "--image-size",
            32,
            "--out",
            tmp_path / "m",
        ]
    )
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "m" / "indices.json").read_text()) == json.loads(
        (tmp_path / "r" / "indices.json").read_text()
    )


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _library_model(spec, kwargs, tuned_state):
    """The library's own model with a fine-tuned run's weights, loaded by hand."""
    if spec.startswith("hf:"):
        model = transformers.AutoModelForCausalLM.from_pretrained(spec[3:])
    elif spec.startswith("timm:"):
        model = timm.create_model(spec[5:], num_classes=10, **kwargs)
    else:
        model = torchvision.models.get_model(spec.split(":")[1], num_classes=10)
    model.load_state_dict({k.removeprefix("network."): v for k, v in tuned_state.items()})
    return model.eval()


FINE_TUNED = {
    "timm:resnet18": ({}, None),
    "timm:vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 3}, None),
    "torchvision:resnet50": ({}, 32),
    "gpt2": ({}, None),
    "llama": ({}, None),
}


@pytest.mark.parametrize(
    "case",
    [
        "timm:resnet18",
        "timm:vit_tiny_patch16_224",
        "gpt2",
        *(pytest.param(c, marks=pytest.mark.slow) for c in ("torchvision:resnet50", "llama")),
    ],
)
def test_a_fine_tuned_networks_indices_and_error_equal_the_hand_computation(case, folder, tmp_path):
    """Fine-tuned with coupling and the extra-iteration loss; the checkpoint's network, loaded by hand into the
    library's own model, gives the indices.json and the last epoch's test error that train wrote."""
    kwargs, image_size = FINE_TUNED[case]
    if case in ("gpt2", "llama"):
        directory, text = language_model(tmp_path, case)
        spec, data, extra = f"hf:{directory}", f"text:{text}", ["--pretrained", "--seq-len", 12]
    else:
        spec, data = case, f"imagefolder:{folder}"
        extra = [f"--model-kwargs={k}={v}" for k, v in kwargs.items()] + (
            ["--image-size", image_size] if image_size else []
        )
    result = invoke(
        [
            "train",
            "--model",
            spec,
            "--data",
            data,
            *extra,
            "--lam",
            0.5,
            *TUNE,
            "--epochs",
            1,
            *QUIET,
            "--out",
            tmp_path / "run",
        ]
    )
    assert result.exit_code == 0, result.output
    model = _library_model(spec, kwargs, torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"])
    if case in ("gpt2", "llama"):
        inputs, targets = token_windows_by_hand(directory, text, 12)
        held = max(1, round(0.2 * len(inputs)))
        data_by_hand = [(inputs[-held:], targets[-held:])]
        error_fn, chance = sequence_error, 1 - 1 / model.config.vocab_size
    else:
        if case.startswith("timm:"):
            _, transform, _ = timm_case(case[5:], kwargs)
        else:
            _, transform, _ = torchvision_case(case.split(":")[1], image_size)
        data_by_hand = hand_batches(folder / "val", transform)
        error_fn, chance = None, 0.9
    report = compute_indices(
        residual_model(model), data_by_hand, extra_iterations=16, error_fn=error_fn, chance_error=chance
    )
    assert_same_indices(json.loads((tmp_path / "run" / "indices.json").read_text()), report)
    with torch.no_grad():
        wrong = sum(int(_logits(model(x)).argmax(-1).ne(y).sum()) for x, y in data_by_hand)
    scored = sum(y.numel() for _, y in data_by_hand)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"][-1]["test_error"] == pytest.approx(wrong / scored)


def test_frozen_batchnorm_trains_with_the_running_statistics_and_keeps_them(folder, tmp_path):
    model, _, _ = torchvision_case("resnet18", 32)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    result = invoke(
        [
            "train",
            "--model",
            "torchvision:resnet18",
            "--weights",
            tmp_path / "w.pt",
            "--data",
            f"imagefolder:{folder}",
            "--image-size",
            32,
            "--freeze-bn",
            *TUNE,
            "--epochs",
            1,
            *QUIET,
            "--out",
            tmp_path / "run",
        ]
    )
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    before = model.state_dict()
    for key in before:
        if "running_" in key or "num_batches_tracked" in key:
            torch.testing.assert_close(state["network." + key], before[key], rtol=0, atol=0)
    assert any(not torch.equal(state["network." + k], before[k]) for k in before if k.endswith("bn1.weight"))
    from itconv_fast.experiments.training_run import freeze_batchnorm

    model.train()
    freeze_batchnorm(model)
    assert model.training and not model.bn1.training and model.layer1[0].conv1.training
