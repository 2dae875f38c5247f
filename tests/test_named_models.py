"""Models by name and data by path from the command line (`--model torchvision:resnet18 --data imagefolder:DIR`):
the measuring commands' numbers equal the same computation written by hand with the libraries (torchvision's
ImageFolder and transforms, timm's data config, transformers' tokenizer, `residual_model`, `compute_indices`), on
random weights, a generated image folder and a text file; weights come from a file, the libraries' local caches or
nowhere, and every way that fails is one line. Fine-tuning: test_fine_tuning.py."""

import json
import pickle
import warnings

import pytest
import torch
from named_fixtures import (
    IMAGE_CASES,
    assert_same_indices,
    hand_batches,
    image_folder,
    invoke,
    language_model,
    token_windows_by_hand,
    torchvision_case,
)

from itconv_fast import compute_indices
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
    result = invoke(args)
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "indices.json").read_text())
    data = hand_batches(folder / "val", transform)
    report = compute_indices(residual_model(model.eval()), data, extra_iterations=3, chance_error=0.9)
    assert_same_indices(written, report)


@pytest.mark.slow
def test_indices_of_a_torchvision_resnet50_equal_the_hand_computation(folder, tmp_path):
    model, transform, _ = torchvision_case("resnet50", 32)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    result = invoke(
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
        residual_model(model.eval()), hand_batches(folder / "val", transform), extra_iterations=2, chance_error=0.9
    )
    assert_same_indices(json.loads((tmp_path / "indices.json").read_text()), report)
    assert [len(s["e_drop"]) for s in json.loads((tmp_path / "indices.json").read_text())["stages"]] == [2, 3, 5, 2]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_indices_of_a_language_model_on_a_text_file_equal_the_hand_computation(kind, tmp_path):
    directory, text = language_model(tmp_path, kind)
    result = invoke(
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
    assert_same_indices(written, report)
    assert written["chance_error"] == pytest.approx(1 - 1 / vocab)


def test_a_script_model_by_name(folder, tmp_path):
    script = tmp_path / "models.py"
    script.write_text(
        "import torch, torchvision\n"
        "def build(num_classes, width_factor=1):\n"
        "    torch.manual_seed(0)\n"
        "    return torchvision.models.resnet18(num_classes=num_classes)\n"
    )
    result = invoke(
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
    model, transform, _ = torchvision_case("resnet18", 32)  # the script's model (same seed, same weights)
    report = compute_indices(
        residual_model(model.eval()), hand_batches(folder / "val", transform), extra_iterations=2, chance_error=0.9
    )
    assert_same_indices(json.loads((tmp_path / "indices.json").read_text()), report)


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
    result = invoke(["data", "imagefolder", "--out", tmp_path / "f", "--train-size", 20, "--val-size", 10])
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
    missing = invoke(args)
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
    assert invoke(args).exit_code == 0
    # timm's weights: the Hugging Face cache, named in the error when they are not there.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    result = invoke(["indices", "--model", "timm:resnet18", "--pretrained", "--data", f"imagefolder:{folder}"])
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
        result = invoke(["indices", *args, "--image-size", 32])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output.replace("\n", " "), (args, result.output)
        if hint:
            assert hint in result.output
        assert "Traceback" not in result.output
    both = invoke(["indices", str(folder), "--model", "torchvision:resnet18"])
    assert both.exit_code == 2 and "not both" in both.output
    lone = invoke(["train", "--model", "torchvision:resnet18", "--out", tmp_path / "r"])
    assert lone.exit_code == 2 and "--data" in lone.output and not (tmp_path / "r").exists()


def test_a_run_configuration_names_its_model_and_data_together():
    from itconv_fast.experiments.config import ConfigError, build_config

    config = build_config("quick", {"model": "timm:resnet18", "data": "imagefolder:x", "model_kwargs": {"a": [1]}})
    assert config.model_kwargs == {"a": [1]} and config.seq_len == 64
    assert config.train_size is None and config.test_size is None  # not the quick preset's 12,000 / 2,000
    for values, key in (
        ({"model": "timm:resnet18"}, "data"),
        ({"data": "imagefolder:x"}, "model"),
        ({"model": "resnet18", "data": "imagefolder:x"}, "model"),
        ({"model": "timm:resnet18", "data": "folder:x"}, "data"),
        ({"model": "timm:resnet18", "data": "text:x", "model_kwargs": {"not a name": 1}}, "model_kwargs"),
        ({"model": "timm:resnet18", "data": "text:x", "model_kwargs": {"a": object()}}, "model_kwargs"),
    ):
        with pytest.raises(ConfigError) as caught:
            build_config("quick", values)
        assert caught.value.key == key, values


def test_random_weights_are_drawn_from_the_runs_seed(folder, tmp_path):
    args = [
        "indices",
        "--model",
        "timm:resnet18",
        "--data",
        f"imagefolder:{folder}",
        "--image-size",
        32,
        "--extra-iterations",
        1,
    ]
    torch.manual_seed(123)  # the caller's generator does not matter
    first = invoke([*args, "--out", tmp_path / "a"])
    torch.rand(5)
    second = invoke([*args, "--out", tmp_path / "b"])
    assert first.exit_code == second.exit_code == 0, first.output
    assert (tmp_path / "a" / "indices.json").read_text() == (tmp_path / "b" / "indices.json").read_text()


def test_measuring_reads_the_held_out_split_alone(tmp_path):
    root = image_folder(tmp_path, train=12, val=10)
    (root / "train" / "3" / "broken.png").write_bytes(b"not an image")
    prep = ImagePreprocessing(32, 36)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # train/ and its broken file are never opened
        task = image_folder_task(str(root), prep, hold_out=False)
    assert len(task.train) == 0 and len(task.test) == 10
    with pytest.warns(RuntimeWarning, match="skipped 1 of 13"):
        task = image_folder_task(str(root), prep, hold_out=True)
    assert (len(task.train), len(task.test), task.info["skipped_images"]) == (12, 10, 1)


def test_lipschitz_of_a_model_by_name_equals_the_report_on_the_same_network(tmp_path):
    """`lipschitz --model`: the seed-0 network the library builds, measured on zeros of --image-size, as by hand; the
    products of an unmeasured column print as '-'; SOURCE and --model are one or the other."""
    from itconv_fast import lipschitz_report

    model, _, _ = torchvision_case("resnet18", 32)
    args = ["lipschitz", "--model", "torchvision:resnet18", "--model-kwargs", "num_classes=10", "--image-size", 32]
    result = invoke([*args, "--power-iterations", 5, "--no-gram", "--json", tmp_path / "l.json"])
    assert result.exit_code == 0, result.output
    by_hand = lipschitz_report(model.eval(), torch.zeros(1, 3, 32, 32), power_iterations=5, gram=False).to_dict()
    by_hand = json.loads(json.dumps(by_hand))  # as written
    written = json.loads((tmp_path / "l.json").read_text())
    assert written["layers"] == by_hand["layers"] and written["product_operator"] == by_hand["product_operator"]
    assert {r["name"]: r["input_size"] for r in written["layers"]}["layer1.0.conv1"] == [8, 8]
    product = next(line for line in result.output.splitlines() if line.startswith("product"))
    assert "nan" not in product and product.split()[-1] == "-"
    # A language model by name: transformers' Conv1D projections (linear layers stored transposed) are measured.
    directory, _ = language_model(tmp_path, "gpt2")
    lm = ["lipschitz", "--model", f"hf:{directory}", "--pretrained", "--seq-len", 12, "--no-gram", "--json"]
    result = invoke([*lm, tmp_path / "lm.json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads((tmp_path / "lm.json").read_text())["layers"]}
    weight = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).transformer.h[0].attn.c_attn.weight
    expected = torch.linalg.matrix_norm(weight.detach().double(), ord=2).item()
    assert rows["transformer.h.0.attn.c_attn"]["matrix"] == pytest.approx(expected, rel=1e-5)
    for bad, message in (
        ([], "give a SOURCE"),
        ([tmp_path / "l.json", "--model", "torchvision:resnet18"], "not both"),
        ([tmp_path / "l.json", "--weights", tmp_path / "l.json"], "--weights goes with --model"),
        ([tmp_path / "l.json", "--image-size", 32], "--image-size goes with --model"),
        (["--model", "torchvision:no_such_net"], "no such model"),
    ):
        result = invoke(["lipschitz", *bad])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
