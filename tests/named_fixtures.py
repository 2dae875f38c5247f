"""What the tests of models by name and data by path are run on: a generated image folder (with one corrupt file when
asked), and a Hugging Face model directory (random weights, a word-level tokenizer) with a text file in its
language. Nothing is downloaded."""

from __future__ import annotations

import random

import pytest
import torch
from click.testing import CliRunner

from itconv_fast.cli.app import main
from itconv_fast.data import digitclutter
from itconv_fast.data.image_folder import write_image_folder

CLASSES = [str(d) for d in range(10)]
WORDS = "the a small big red blue cat dog bird sees likes chases .".split()


def image_folder(root, train=40, val=20, corrupt=False):
    """root/train/<digit>/*.png and root/val/<digit>/*.png: Digitclutter images of one digit, 32 x 32 grey."""
    for split, size, seed in (("train", train, 0), ("val", val, 1)):
        images, labels = digitclutter.generate(size, 1, seed)
        write_image_folder(str(root / split), images, labels.argmax(1), CLASSES)
    if corrupt:
        (root / "val" / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def _sentence(rng):
    return " ".join(
        [
            rng.choice(["the", "a"]),
            rng.choice(["small", "big", "red", "blue"]),
            rng.choice(["cat", "dog", "bird"]),
            rng.choice(["sees", "likes", "chases"]),
            rng.choice(["the", "a"]),
            rng.choice(["cat", "dog", "bird"]),
            ".",
        ]
    )


def language_model(root, kind="gpt2", sentences=120):
    """(model directory, text file): a random-weight GPT-2 or Llama-style model saved with a word-level tokenizer,
    and a text of `sentences` sentences of its small grammar."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text(" ".join(_sentence(rng) for _ in range(sentences)), encoding="utf-8")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory = root / kind
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(directory)
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=len(vocab), n_layer=3, n_embd=32, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=len(vocab),
            num_hidden_layers=3,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return directory, text


def token_windows_by_hand(directory, text, seq_len):
    """The text's next-token examples, tokenised and cut as a user would by hand."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    ids = tokenizer(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    n = (len(ids) - 1) // seq_len
    ids = torch.tensor(ids)
    return ids[: n * seq_len].view(n, seq_len), ids[1 : n * seq_len + 1].view(n, seq_len)


# ----------------------------------------------------------------------------------------------------------------
# The hand computations: what a user writes with the libraries themselves, and the command line's runner.


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def hand_batches(val_dir, transform):
    """The folder's images through torchvision's ImageFolder and a DataLoader."""
    import torchvision

    dataset = torchvision.datasets.ImageFolder(str(val_dir), transform=transform, allow_empty=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=512)
    return [(x, y) for x, y in loader]


def torchvision_case(name, image_size):
    """(model with seed-0 random weights, torchvision's eval transform at the crop image_size, extra CLI flags)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10)
    preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    resize = round(image_size * preset.resize_size[0] / preset.crop_size[0])  # the weights' ratio at the new crop
    from torchvision.transforms._presets import ImageClassification

    return model, ImageClassification(crop_size=image_size, resize_size=resize), []


def timm_case(name, kwargs):
    """(model with seed-0 random weights, timm's eval transform from its data config, the --model-kwargs flags)."""
    import timm
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs)
    size = kwargs.get("img_size", 224)
    config = resolve_data_config({"input_size": (3, size, size)}, model=model)
    flags = [f"--model-kwargs={k}={v}" for k, v in kwargs.items()]
    return model, create_transform(**config), flags


IMAGE_CASES = {
    "torchvision:resnet18": lambda: torchvision_case("resnet18", 32),
    "timm:resnet18": lambda: timm_case("resnet18", {}),
    "timm:vit_tiny_patch16_224": lambda: timm_case(
        "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3}
    ),
}


def assert_same_indices(written: dict, report):
    assert written["n"] == report.n and written["error"] == pytest.approx(report.error)
    assert len(written["stages"]) == len(report.stages)
    for mine, theirs in zip(written["stages"], report.stages):
        assert mine["e_conv"] == pytest.approx(theirs.e_conv) and mine["e_drop"] == pytest.approx(theirs.e_drop)
        assert mine["e_div"] == pytest.approx(theirs.e_div)
