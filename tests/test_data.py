"""Data sets: the Digitclutter generator, the task's scoring, the readers, download, caching, batching."""

import gzip
import hashlib
import http.server
import io
import os
import pickle
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest
import torch

from itconv_fast.data import datasets, digitclutter, vision

# ---------------------------------------------------------------------------------------------
# Digitclutter
# ---------------------------------------------------------------------------------------------


def test_shapes_and_dtypes():
    images, labels = digitclutter.generate(50, 4, seed=1)
    assert images.shape == (50, 1, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (50, 10) and labels.dtype == torch.float32


@pytest.mark.parametrize("n", [3, 4, 5])
def test_label_counts_are_n_distinct_digits(n):
    _, labels = digitclutter.generate(300, n, seed=2)
    assert torch.all(labels.sum(1) == n)
    assert set(labels.unique().tolist()) == {0.0, 1.0}
    assert torch.all(labels.sum(0) > 0)  # every digit occurs


def test_deterministic_for_a_seed_and_across_processes():
    a = digitclutter.generate(64, 3, seed=7)
    b = digitclutter.generate(64, 3, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = digitclutter.generate(64, 3, seed=8)
    assert not torch.equal(a[0], c[0])
    code = (
        "import hashlib, sys; from itconv_fast.data import digitclutter as d; "
        "x, y = d.generate(64, 3, seed=7); print(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == hashlib.sha256(a[0].numpy().tobytes() + a[1].numpy().tobytes()).hexdigest()


def test_background_level():
    images, _ = digitclutter.generate(200, 3, seed=3)
    values, counts = images.unique(return_counts=True)
    assert values[counts.argmax()].item() == 119  # the grey background is the commonest level
    assert (images == 119).float().mean() > 0.3
    assert images.min() < 30 and images.max() > 220  # black faces and white outlines are present


def test_glyph_masks_are_black_faces_with_white_outlines():
    for g in digitclutter.glyph_masks():
        assert g.alpha.max() == pytest.approx(1.0) and g.alpha.min() >= 0
        inside = g.alpha > 0.999
        # the outline is white, the face black: both occur among fully covered pixels
        assert (g.white[inside] > 250).any() and (g.white[inside] < 5).any()


def _compose(monkeypatch, digits, ys, xs):
    def fixed(rng, n_images, n_digits):
        return (np.array([digits]), np.array([xs], dtype=float), np.array([ys], dtype=float))

    monkeypatch.setattr(digitclutter, "_draw_parameters", fixed)
    return digitclutter.generate(1, len(digits), seed=0)[0][0, 0]


def test_later_digits_occlude_earlier_ones(monkeypatch):
    only_eight = _compose(monkeypatch, [8], [0.076], [0.0])
    one_then_eight = _compose(monkeypatch, [1, 8], [0.076, 0.076], [0.05, 0.0])
    eight_then_one = _compose(monkeypatch, [8, 1], [0.076, 0.076], [0.0, 0.05])
    # Where the 8 (drawn last) fully covers the output pixel, the image shows the 8 alone.
    g = digitclutter.glyph_masks()[8]
    full = torch.from_numpy(g.alpha >= 0.999)
    s = digitclutter.SUPERSAMPLE * digitclutter.IMAGE_SIZE
    canvas = torch.zeros(s, s, dtype=torch.bool)
    top, left = round((0.5 + 0.076) * s) - g.cy, round(0.5 * s) - g.cx
    canvas[top : top + full.shape[0], left : left + full.shape[1]] = full
    covered = canvas.view(32, 4, 32, 4).all(dim=3).all(dim=1)
    assert covered.sum() > 20
    assert torch.equal(one_then_eight[covered], only_eight[covered])
    assert not torch.equal(eight_then_one[covered], only_eight[covered])


def test_debris_has_one_label():
    images, labels = digitclutter.generate(20, debris=True, seed=0)
    assert images.shape == (20, 1, 32, 32) and torch.all(labels.sum(1) == 1)


@pytest.mark.parametrize(
    "kwargs", [dict(n_images=-1), dict(n_images=3, n_digits=0), dict(n_images=3, n_digits=11), dict(n_images=2.5)]
)
def test_generator_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        digitclutter.generate(**kwargs)


def test_exact_set_scoring_and_chance():
    labels = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0, 0, 1.0], [0, 0, 1, 1, 1, 0, 0, 0, 0, 0.0]])
    logits = torch.tensor([[5, 4, 0, 0, 0, 0, 0, 0, 0, 3.0], [0, 9, 1, 2, 3, 0, 0, 0, 0, 0.0]])
    assert digitclutter.exact_set_correct(logits, labels).tolist() == [True, False]
    assert digitclutter.exact_set_error(logits, labels) == 0.5
    assert digitclutter.chance_error(3) == pytest.approx(1 - 1 / 120)


@pytest.mark.slow
def test_learnable_by_a_small_cnn():
    """A small CNN trained for under a minute beats chance (1/45 for two digits) by far."""
    torch.manual_seed(0)
    task = datasets.load("digitclutter", n_digits=2, train_size=12000, test_size=1000, cache_dir=None)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(64, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(256, 10),
    )
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    gen = torch.Generator().manual_seed(0)
    start = time.time()
    for _ in range(3):
        for x, y in datasets.batches(task, task.train, 128, train=True, generator=gen):
            opt.zero_grad()
            task.loss(net(x), y).backward()
            opt.step()
    assert time.time() - start < 90
    with torch.no_grad():
        correct = torch.cat([task.correct(net(x), y) for x, y in datasets.batches(task, task.test, 500, train=False)])
    accuracy = correct.float().mean().item()
    assert accuracy > 10 * (1 - task.chance_error), accuracy


# ---------------------------------------------------------------------------------------------
# Digitclutter cache
# ---------------------------------------------------------------------------------------------


def test_cache_is_reused_and_corrupt_files_regenerated(tmp_path):
    a = datasets.digitclutter_set(40, 3, 5, str(tmp_path))
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and "n3" in files[0].name and "N40" in files[0].name and "seed5" in files[0].name
    b = datasets.digitclutter_set(40, 3, 5, str(tmp_path))
    assert torch.equal(a[0], b[0])
    # A partial file (cut short) and a file with flipped bytes are both detected and regenerated.
    for damage in ("truncate", "flip"):
        raw = files[0].read_bytes()
        if damage == "truncate":
            files[0].write_bytes(raw[: len(raw) // 2])
        else:
            arr = np.load(files[0])
            images = arr["images"].copy()
            images[0, 0, 0, 0] ^= 0xFF
            np.savez(files[0], images=images, labels=arr["labels"], sha256=arr["sha256"], params=arr["params"])
        with pytest.warns(RuntimeWarning, match="regenerating"):
            c = datasets.digitclutter_set(40, 3, 5, str(tmp_path))
        assert torch.equal(a[0], c[0])
        datasets.read_digitclutter(str(files[0]))  # rewritten intact


def test_cli_pregenerates(tmp_path):
    from click.testing import CliRunner

    from itconv_fast.cli.app import main

    out = tmp_path / "dc.npz"
    result = CliRunner().invoke(
        main, ["data", "digitclutter", "--n-digits", "5", "--size", "30", "--seed", "0", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    images, labels = datasets.read_digitclutter(str(out))
    assert images.shape == (30, 1, 32, 32) and torch.all(labels.sum(1) == 5)
    assert torch.equal(images, digitclutter.generate(30, 5, 0)[0])
    bad = CliRunner().invoke(main, ["data", "digitclutter", "--n-digits", "11", "--out", str(out)])
    assert bad.exit_code == 2


# ---------------------------------------------------------------------------------------------
# Real digits from scikit-learn's package data
# ---------------------------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_complete():
    from sklearn.datasets import load_digits

    reference = load_digits()
    task = datasets.load("digits")
    assert (task.num_classes, task.in_channels, task.chance_error, task.multilabel) == (10, 1, 0.9, False)
    assert task.train.images.shape == (1297, 1, 8, 8) and task.test.images.shape == (500, 1, 8, 8)
    assert task.train.images.dtype == torch.uint8 and task.train.images.max() == 255
    # Every image once, in one split: the pixels (0..16 scaled to 0..255) and labels are the package's.
    images = torch.cat([task.train.images, task.test.images]).flatten(1).double() * 16 / 255
    labels = torch.cat([task.train.targets, task.test.targets])
    expected = torch.from_numpy(reference.data)
    order = [int(i) for i in np.lexsort(images.numpy().T[::-1])]
    expected_order = [int(i) for i in np.lexsort(expected.numpy().T[::-1])]
    assert torch.allclose(images[order], expected[expected_order], atol=0.04)
    assert torch.equal(labels[order], torch.from_numpy(reference.target)[expected_order])
    counts = torch.bincount(task.test.targets, minlength=10)
    assert counts.min() >= 48 and counts.max() <= 51  # stratified: 500 of 1,797 per class
    # The test split is the same for every seed; train_size is a seeded stratified subset of the rest.
    other = datasets.load("digits", seed=3, train_size=648)
    assert torch.equal(other.test.images, task.test.images) and len(other.train) == 648
    assert torch.bincount(other.train.targets, minlength=10).min() >= 62
    # The normalisation constants are the training split's.
    x = task.train.images.double() / 255
    assert abs(x.mean() - task.mean[0]) < 1e-3 and abs(x.std() - task.std[0]) < 1e-3


def test_digits_without_scikit_learn_is_one_clear_error(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from itconv_fast.cli.app import main

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # what `import` sees when it is not installed
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        datasets.load("digits")
    result = CliRunner().invoke(main, ["train", "--dataset", "digits", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "pip install scikit-learn" in result.output
    assert not (tmp_path / "run").exists()


def test_train_on_digits_learns(tmp_path):
    import json

    from click.testing import CliRunner

    from itconv_fast.cli.app import main

    out = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--out", str(out), "--epochs", "3", "--no-progress", "--compile", "off"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"][-1]["test_error"] < 0.5  # chance is 0.9


# ---------------------------------------------------------------------------------------------
# MNIST and CIFAR readers against fixtures in the official formats
# ---------------------------------------------------------------------------------------------


def write_idx(path, array, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_mnist(root, gz=True, n=(12, 6)):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, count in zip(("train", "t10k"), n):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        ext = ".gz" if gz else ""
        write_idx(raw / f"{prefix}-images-idx3-ubyte{ext}", images, gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{ext}", labels, gz)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reader(tmp_path, gz):
    expected = make_mnist(tmp_path, gz)
    images, labels = vision.load_mnist(str(tmp_path), train=True)
    assert images.shape == (12, 1, 28, 28) and images.dtype == torch.uint8
    assert np.array_equal(images[:, 0].numpy(), expected["train"][0])
    assert np.array_equal(labels.numpy(), expected["train"][1])
    task = datasets.load("mnist", data_dir=str(tmp_path), train_size=10)
    assert len(task.train) == 10 and len(task.test) == 6 and task.in_channels == 1


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda b: b"\x00\x00\x0d\x03" + b[4:], "not unsigned byte"),
        (lambda b: b"\x01\x02" + b[2:], "bad magic"),
        (lambda b: b[:-5], "holds"),
    ],
)
def test_corrupt_idx_rejected(tmp_path, corrupt, match):
    make_mnist(tmp_path, gz=False)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(vision.DatasetFilesError, match=match):
        vision.load_mnist(str(tmp_path), train=True)


def test_missing_files_list_expected_names_and_download_hint(tmp_path):
    with pytest.raises(vision.DatasetFilesError, match="train-images-idx3-ubyte.*--download"):
        vision.load_mnist(str(tmp_path), train=True)
    with pytest.raises(vision.DatasetFilesError, match="cifar-10-python.tar.gz.*--download"):
        vision.load_cifar("cifar10", str(tmp_path), train=True)


def cifar_batches(name, rng):
    key, classes = (b"labels", 10) if name == "cifar10" else (b"fine_labels", 100)
    members = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if name == "cifar10" else ["train", "test"]
    out = {}
    for m in members:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        out[m] = {
            b"batch_label": b"x",
            key: [int(v) for v in rng.integers(0, classes, 4)],
            b"data": data,
            b"filenames": [b"a.png"] * 4,
        }
    return out


def write_cifar(root, name, as_tar):
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    batches = cifar_batches(name, np.random.default_rng(1))
    if as_tar:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for m, obj in batches.items():
                raw = pickle.dumps(obj, protocol=2)
                info = tarfile.TarInfo(f"{folder}/{m}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
        archive = root / ("cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz")
        archive.write_bytes(buf.getvalue())
    else:
        (root / folder).mkdir(parents=True)
        for m, obj in batches.items():
            (root / folder / m).write_bytes(pickle.dumps(obj, protocol=2))
    return batches


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar_reader(tmp_path, name, as_tar):
    batches = write_cifar(tmp_path, name, as_tar)
    images, labels = vision.load_cifar(name, str(tmp_path), train=True)
    n_train = 20 if name == "cifar10" else 4
    assert images.shape == (n_train, 3, 32, 32) and labels.dtype == torch.int64
    first = batches["data_batch_1" if name == "cifar10" else "train"]
    assert np.array_equal(images[:4].numpy().reshape(4, -1), first[b"data"])
    task = datasets.load(name, data_dir=str(tmp_path))
    assert task.augment and task.in_channels == 3 and len(task.test) == 4


@pytest.mark.parametrize(
    "payload,match",
    [
        (b"not a pickle at all", "not a valid CIFAR batch"),
        (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), r"data \(2, 100\)"),
        (pickle.dumps({b"labels": [0]}), "lacks the entry"),
        (pickle.dumps(os.system), "forbidden global"),  # no code execution from a hostile file
    ],
)
def test_corrupt_cifar_pickles_rejected(tmp_path, payload, match):
    write_cifar(tmp_path, "cifar10", as_tar=False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(payload)
    with pytest.raises(vision.DatasetFilesError, match=match) as info:
        vision.load_cifar("cifar10", str(tmp_path), train=True)
    assert "data_batch_3" in str(info.value)


def test_truncated_cifar_archive_rejected(tmp_path):
    write_cifar(tmp_path, "cifar10", as_tar=True)
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(vision.DatasetFilesError, match="cifar-10-python.tar.gz"):
        vision.load_cifar("cifar10", str(tmp_path), train=True)


# ---------------------------------------------------------------------------------------------
# Download against a local HTTP server (127.0.0.1 only)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fixture_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    write_cifar(served, "cifar10", as_tar=True)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", served / "cifar-10-python.tar.gz"
    finally:
        server.shutdown()
        server.server_close()


def test_download_verifies_checksum(tmp_path, monkeypatch, fixture_server):
    base, archive = fixture_server
    good = vision.md5sum(str(archive))
    data_dir = tmp_path / "data"
    monkeypatch.setitem(
        vision.RESOURCES, "cifar10", [vision.Resource("cifar-10-python.tar.gz", base + "cifar-10-python.tar.gz", good)]
    )
    task = datasets.load("cifar10", data_dir=str(data_dir), download=True)
    assert len(task.train) == 20
    assert vision.md5sum(str(data_dir / "cifar-10-python.tar.gz")) == good


def test_download_with_wrong_checksum_is_an_error_and_leaves_nothing(tmp_path, monkeypatch, fixture_server):
    base, _ = fixture_server
    data_dir = tmp_path / "data"
    monkeypatch.setitem(
        vision.RESOURCES,
        "cifar10",
        [vision.Resource("cifar-10-python.tar.gz", base + "cifar-10-python.tar.gz", "0" * 32)],
    )
    with pytest.raises(vision.DatasetFilesError, match="cifar-10-python.tar.gz: md5"):
        datasets.load("cifar10", data_dir=str(data_dir), download=True)
    assert list(data_dir.iterdir()) == []  # the bad file is not kept, so it cannot be used later


# ---------------------------------------------------------------------------------------------
# Batching, augmentation, subsets
# ---------------------------------------------------------------------------------------------


def test_stratified_subset_keeps_class_proportions():
    targets = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    idx = datasets.stratified_subset(targets, 20, seed=0)
    counts = torch.bincount(targets[idx], minlength=3).tolist()
    assert counts == [12, 6, 2] and idx.unique().numel() == 20
    assert torch.equal(idx, datasets.stratified_subset(targets, 20, seed=0))
    assert not torch.equal(idx, datasets.stratified_subset(targets, 20, seed=1))


def test_augmentation_is_a_padded_crop_or_flip():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32) + 1
    out = datasets._augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for b in range(2):
        # Each output is the input shifted by at most 4 px (zeros where padding shows), maybe mirrored.
        matches = False
        for flip in (False, True):
            src = x[b].flip(-1) if flip else x[b]
            padded = torch.nn.functional.pad(src, (4, 4, 4, 4))
            for dy in range(9):
                for dx in range(9):
                    if torch.equal(padded[:, dy : dy + 32, dx : dx + 32], out[b]):
                        matches = True
        assert matches


def test_batches_normalise_and_cover_the_split():
    task = datasets.load("digitclutter", train_size=50, test_size=20, cache_dir=None)
    seen = 0
    for x, y in datasets.batches(task, task.test, 8, train=False):
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 32, 32)
        seen += x.shape[0]
    assert seen == 20
    x, _ = next(datasets.batches(task, task.train, 50, train=True, generator=torch.Generator().manual_seed(0)))
    assert abs(x.mean().item()) < 0.3 and 0.6 < x.std().item() < 1.4


def test_load_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.load("imagenet")
    with pytest.raises(ValueError, match="data directory"):
        datasets.load("mnist")
    with pytest.raises(ValueError, match="train_size"):
        datasets.load("digitclutter", train_size=0)


def test_the_command_line_offers_every_data_set_the_library_loads():
    """`train --dataset` spells its choices out (the CLI module imports no torch at load); they must be the
    library's."""
    from itconv_fast.cli.app import main
    from itconv_fast.experiments.config import DATASETS as CONFIG_DATASETS

    option = next(p for p in main.commands["train"].params if p.name == "dataset")
    assert tuple(option.type.choices) == datasets.DATASETS == CONFIG_DATASETS
