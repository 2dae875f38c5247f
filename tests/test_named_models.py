"""Models by name and data by path from the command line (`--model torchvision:resnet18 --data imagefolder:DIR`):
each command's numbers equal the same computation written by hand with the libraries (torchvision's ImageFolder and
transforms, timm's data config, transformers' tokenizer, `residual_model`, `compute_indices`), on random weights, a
generated image folder and a text file; weights come from a file, the libraries' local caches or nowhere, and every
way that fails is one line."""

import json
import math
import pickle
import warnings

import pytest
import torch
from click.testing import CliRunner
from named_fixtures import image_folder, language_model, token_windows_by_hand

from itconv_fast import compute_indices
from itconv_fast.cli.app import main
from itconv_fast.data.datasets import image_folder_task
from itconv_fast.data.image_folder import ImagePreprocessing, read_image_folder
from itconv_fast.models.integrations import residual_model
from itconv_fast.models.named import ModelNameError, parse_model_name
from itconv_fast.models.residual import sequence_error

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


def _invoke(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


# ----------------------------------------------------------------------------------------------------------------
# The hand computations: what a user writes with the libraries themselves.


def _hand_batches(val_dir, transform):
    dataset = torchvision.datasets.ImageFolder(str(val_dir), transform=transform, allow_empty=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=512)
    return [(x, y) for x, y in loader]


def _torchvision_case(name, image_size):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10)
    preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    resize = round(image_size * preset.resize_size[0] / preset.crop_size[0])  # the weights' ratio at the new crop
    from torchvision.transforms._presets import ImageClassification

    return model, ImageClassification(crop_size=image_size, resize_size=resize), []


def _timm_case(name, kwargs):
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs)
    size = kwargs.get("img_size", 224)
    config = resolve_data_config({"input_size": (3, size, size)}, model=model)
    flags = [f"--model-kwargs={k}={v}" for k, v in kwargs.items()]
    return model, create_transform(**config), flags


IMAGE_CASES = {
    "torchvision:resnet18": lambda: _torchvision_case("resnet18", 32),
    "timm:resnet18": lambda: _timm_case("resnet18", {}),
    "timm:vit_tiny_patch16_224": lambda: _timm_case(
        "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3}
    ),
}


def _assert_same_indices(written: dict, report, stages=None):
    assert written["n"] == report.n and written["error"] == pytest.approx(report.error)
    assert len(written["stages"]) == len(report.stages)
    for mine, theirs in zip(written["stages"], report.stages):
        assert mine["e_conv"] == pytest.approx(theirs.e_conv) and mine["e_drop"] == pytest.approx(theirs.e_drop)
        assert mine["e_div"] == pytest.approx(theirs.e_div)


@pytest.mark.parametrize("spec", sorted(IMAGE_CASES))
def test_indices_of_an_image_model_by_name_equal_the_hand_computation(spec, folder, tmp_path):
    model, transform, flags = IMAGE_CASES[spec]()
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    size_flags = ["--image-size", 32] if spec.startswith("torchvision") else []
    args = [
        "indices",
        "--model",
        spec,
        *flags,
        "--weights",
        weights,
        "--data",
        f"imagefolder:{folder}",
        "--extra-iterations",
        3,
        "--out",
        tmp_path / "out",
        *size_flags,
    ]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "indices.json").read_text())
    data = _hand_batches(folder / "val", transform)
    report = compute_indices(residual_model(model.eval()), data, extra_iterations=3, chance_error=0.9)
    _assert_same_indices(written, report)


@pytest.mark.slow
def test_indices_of_a_torchvision_resnet50_equal_the_hand_computation(folder, tmp_path):
    model, transform, _ = _torchvision_case("resnet50", 32)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    result = _invoke(
        [
            "indices",
            "--model",
            "torchvision:resnet50",
            "--weights",
            tmp_path / "w.pt",
            "--data",
            f"imagefolder:{folder}",
            "--image-size",
            32,
            "--extra-iterations",
            2,
            "--out",
            tmp_path,
        ]
    )
    assert result.exit_code == 0, result.output
    report = compute_indices(
        residual_model(model.eval()), _hand_batches(folder / "val", transform), extra_iterations=2, chance_error=0.9
    )
    _assert_same_indices(json.loads((tmp_path / "indices.json").read_text()), report)
    assert [len(s["e_drop"]) for s in json.loads((tmp_path / "indices.json").read_text())["stages"]] == [2, 3, 5, 2]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_indices_of_a_language_model_on_a_text_file_equal_the_hand_computation(kind, tmp_path):
    directory, text = language_model(tmp_path, kind)
    result = _invoke(
        [
            "indices",
            "--model",
            f"hf:{directory}",
            "--pretrained",
            "--data",
            f"text:{text}",
            "--seq-len",
            12,
            "--extra-iterations",
            2,
            "--out",
            tmp_path / "out",
        ]
    )
    assert result.exit_code == 0, result.output
    inputs, targets = token_windows_by_hand(directory, text, 12)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    vocab = model.config.vocab_size
    report = compute_indices(
        residual_model(model),
        (inputs, targets),
        extra_iterations=2,
        error_fn=sequence_error,
        chance_error=1 - 1 / vocab,
    )
    written = json.loads((tmp_path / "out" / "indices.json").read_text())
    _assert_same_indices(written, report)
    assert written["chance_error"] == pytest.approx(1 - 1 / vocab)


def test_a_script_model_by_name(folder, tmp_path):
    script = tmp_path / "models.py"
    script.write_text(
        "import torch, torchvision\n"
        "def build(num_classes, width_factor=1):\n"
        "    torch.manual_seed(0)\n"
        "    return torchvision.models.resnet18(num_classes=num_classes)\n"
    )
    result = _invoke(
        [
            "indices",
            "--model",
            f"{script}:build",
            "--model-kwargs",
            "width_factor=2",
            "--data",
            f"imagefolder:{folder}",
            "--image-size",
            32,
            "--extra-iterations",
            2,
            "--out",
            tmp_path,
        ]
    )
    assert result.exit_code == 0, result.output
    model, transform, _ = _torchvision_case("resnet18", 32)  # the script's model (same seed, same weights)
    report = compute_indices(
        residual_model(model.eval()), _hand_batches(folder / "val", transform), extra_iterations=2, chance_error=0.9
    )
    _assert_same_indices(json.loads((tmp_path / "indices.json").read_text()), report)


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning.


def test_fine_tuning_writes_the_indices_before_and_after_and_resumes(folder, tmp_path):
    model, transform, _ = _torchvision_case("resnet18", 32)
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
        "--objective",
        "extra-iterations:1",
        "--objective-k",
        2,
        "--batch-size",
        20,
        "--lr",
        0.02,
        "--epochs",
        2,
        "--no-progress",
        "--compile",
        "off",
    ]
    result = _invoke([*common, "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert "indices before: error" in result.output and "indices after: error" in result.output
    # Before: the indices of the weights handed in, on the val split, by hand.
    data = _hand_batches(folder / "val", transform)
    before = compute_indices(residual_model(model.eval()), data, extra_iterations=16, chance_error=0.9)
    _assert_same_indices(json.loads((run / "indices_before.json").read_text()), before)
    # After: the fine-tuned checkpoint's network, loaded into a fresh torchvision model by hand.
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    tuned = torchvision.models.resnet18(num_classes=10)
    tuned.load_state_dict({k.removeprefix("network."): v for k, v in state.items()})
    after = compute_indices(residual_model(tuned.eval()), data, extra_iterations=16, chance_error=0.9)
    _assert_same_indices(json.loads((run / "indices.json").read_text()), after)
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
    # The measuring commands rebuild the run's model from its checkpoint.
    result = _invoke(["indices", run])
    assert result.exit_code == 0, result.output
    _assert_same_indices(json.loads((run / "indices.json").read_text()), after)


@pytest.mark.parametrize("kind", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_fine_tuning_a_language_model_with_coupling_and_spectral_norm(kind, tmp_path):
    directory, text = language_model(tmp_path, kind)
    result = _invoke(
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
            "--objective",
            "extra-iterations:1",
            "--objective-k",
            2,
            "--batch-size",
            16,
            "--lr",
            0.02,
            "--epochs",
            2,
            "--no-progress",
            "--compile",
            "off",
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
    result = _invoke(["indices", tmp_path / "run", "--extra-iterations", 2])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "indices.json").read_text())["n"] == held
    assert 0 <= metrics["epochs"][-1]["test_error"] <= 1


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
    result = _invoke([*base, "--measures", "thinking-longer", "--noise-sigma", 0, "--out", tmp_path])
    assert result.exit_code == 0, result.output
    assert set(json.loads((tmp_path / "benefits.json").read_text())["thinking_longer"]) == {"test set"}
    refused = _invoke([*base, "--measures", "robustness"])
    assert refused.exit_code == 2 and "token ids" in refused.output
    image = _invoke(
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


# ----------------------------------------------------------------------------------------------------------------
# Data by path, weights, and what fails.


def test_an_image_folder_is_read_as_torchvision_reads_it_and_skips_unreadable_files(tmp_path):
    root = image_folder(tmp_path, train=12, val=10, corrupt=True)
    prep = ImagePreprocessing(32, 36)
    with pytest.warns(RuntimeWarning, match=r"skipped 1 of 11 images.*broken\.png") as caught:
        images = read_image_folder(str(root / "val"), prep)
    assert len(caught) == 1 and images.skipped[0][0].endswith("broken.png")
    from torchvision.transforms._presets import ImageClassification

    (root / "val" / "3" / "broken.png").unlink()
    by_hand = torchvision.datasets.ImageFolder(
        str(root / "val"), allow_empty=True, transform=ImageClassification(crop_size=32, resize_size=36)
    )
    x, y = next(iter(torch.utils.data.DataLoader(by_hand, batch_size=64)))
    torch.testing.assert_close(images.targets, y)
    mean, std = torch.tensor(prep.mean).view(1, 3, 1, 1), torch.tensor(prep.std).view(1, 3, 1, 1)
    torch.testing.assert_close((images.images.float() / 255 - mean) / std, x, rtol=0, atol=1e-6)
    # One split alone: a fixed, class-stratified 20% is held out for training runs; everything is measured.
    flat = image_folder(tmp_path / "flat", train=30, val=1) / "train"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        training = image_folder_task(str(flat), prep, hold_out=True)
        measuring = image_folder_task(str(flat), prep, hold_out=False)
    assert (len(training.train), len(training.test)) == (24, 6) and len(measuring.test) == 30


def test_the_data_command_writes_an_image_folder(tmp_path):
    result = _invoke(["data", "imagefolder", "--out", tmp_path / "f", "--train-size", 20, "--val-size", 10])
    assert result.exit_code == 0, result.output
    assert len(torchvision.datasets.ImageFolder(str(tmp_path / "f" / "train"), allow_empty=True)) == 20
    assert torchvision.datasets.ImageFolder(str(tmp_path / "f" / "val"), allow_empty=True).classes == [
        str(d) for d in range(10)
    ]


def test_pretrained_weights_come_from_the_local_cache_and_never_a_download(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    args = [
        "indices",
        "--model",
        "torchvision:resnet18",
        "--pretrained",
        "--data",
        f"imagefolder:{folder}",
        "--image-size",
        32,
        "--extra-iterations",
        1,
    ]
    missing = _invoke(args)
    assert missing.exit_code == 2 and "not in the local cache" in missing.output
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in missing.output.replace("\n", "")
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18()  # stands in for the ImageNet weights: the cache file's content is used
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), cached)
    from itconv_fast.models.named import named_model

    model = named_model("torchvision:resnet18", num_classes=10, pretrained=True)
    torch.testing.assert_close(model.network.conv1.weight, imagenet.conv1.weight)
    assert model.network.fc.out_features == 10  # a new head for the folder's 10 classes
    assert _invoke(args).exit_code == 0
    # timm's weights: the Hugging Face cache, named in the error when they are not there.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    result = _invoke(["indices", "--model", "timm:resnet18", "--pretrained", "--data", f"imagefolder:{folder}"])
    assert result.exit_code == 2 and "timm/resnet18" in result.output and str(tmp_path / "hf") in result.output


def test_bad_models_weights_and_data_are_one_line_errors(folder, tmp_path):
    for spec in ("resnet18", "nolib:x", "file.py:not-a-name"):
        with pytest.raises(ModelNameError):
            parse_model_name(spec)
    assert parse_model_name("hf:org/name") == ("hf", "org/name")
    assert parse_model_name("my/models.py:build") == ("file", "my/models.py:build")
    data = f"imagefolder:{folder}"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"conv1.weight": torch.zeros(1), "x": object()}, f)
    wrong_shape = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong_shape)
    cases = [
        (["--model", "torchvision:no_such_net", "--data", data], "--model", "no such model"),
        (["--model", "timm:no_such_net", "--data", data], "--model", "no such model"),
        (["--model", "torchvision:vgg11", "--data", data], "--model", "cannot be wrapped as a residual model"),
        (["--model", "torchvision:resnet18", "--data", data, "--weights", evil], "--weights", "not a readable"),
        (["--model", "torchvision:resnet18", "--data", data, "--weights", wrong_shape], "--weights", "do not fit"),
        (["--model", "torchvision:resnet18", "--data", f"imagefolder:{tmp_path}/none"], "--data", "no such directory"),
        (["--model", "torchvision:resnet18", "--data", "csv:x"], "--data", "imagefolder:DIR or text:FILE"),
        (["--model", "torchvision:resnet18"], None, "--model SPEC with --data SPEC"),
        (["--model", "torchvision:resnet18", "--data", f"text:{tmp_path}/t.txt"], "--model", "Hugging Face model"),
    ]
    (tmp_path / "t.txt").write_text("some words")
    for args, hint, message in cases:
        result = _invoke(["indices", *args, "--image-size", 32])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output.replace("\n", " "), (args, result.output)
        if hint:
            assert hint in result.output
        assert "Traceback" not in result.output
    both = _invoke(["indices", str(folder), "--model", "torchvision:resnet18"])
    assert both.exit_code == 2 and "not both" in both.output
    lone = _invoke(["train", "--model", "torchvision:resnet18", "--out", tmp_path / "r"])
    assert lone.exit_code == 2 and "--data" in lone.output and not (tmp_path / "r").exists()


def test_a_script_models_run_is_measured_with_its_script_named_again(folder, tmp_path):
    script = tmp_path / "models.py"
    script.write_text(
        "import torchvision\ndef build(num_classes):\n    return torchvision.models.resnet18(num_classes=num_classes)\n"
    )
    result = _invoke(
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
            "--no-progress",
            "--compile",
            "off",
            "--out",
            tmp_path / "r",
        ]
    )
    assert result.exit_code == 0, result.output
    refused = _invoke(["indices", tmp_path / "r"])
    assert refused.exit_code == 2 and "which a checkpoint does not run" in refused.output
    again = _invoke(
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
