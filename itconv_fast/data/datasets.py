"""The paper's tasks as in-memory uint8 tensors, with per-batch augmentation on the training device.

task = load("digitclutter", n_digits=3, train_size=20000, test_size=2000, cache_dir="~/.cache/itconv-fast")
for x, y in batches(task, task.train, batch_size=128, train=True, generator=g, device="cuda"):
    ...
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import tokenize
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from . import digitclutter, digits, vision

__all__ = [
    "DATASETS",
    "DATA_KINDS",
    "Split",
    "Task",
    "load",
    "batches",
    "digitclutter_set",
    "stratified_subset",
    "default_cache_dir",
    "parse_data_spec",
    "image_folder_task",
    "text_task",
    "HELD_OUT_SHARE",
]

DATASETS = ("digitclutter", "digits", "mnist", "cifar10", "cifar100")
_STATS = {  # per-channel mean and std of the training images, in [0, 1]
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "digitclutter": ((0.5,), (0.27,)),
    "digits": ((0.3063,), (0.3765,)),  # of the 1,297 training images of the fixed split
}
DIGITCLUTTER_SIZES = {"train": 100_000, "test": 10_000}
_GENERATOR_VERSION = 1  # bump when the generator's output changes: old cache files are then ignored


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    targets: torch.Tensor  # int64 [N] (single label) or float32 multi-hot [N, 10] (Digitclutter)

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class Task:
    name: str
    train: Split
    test: Split
    num_classes: int
    in_channels: int
    mean: tuple
    std: tuple
    augment: bool  # CIFAR's padded random crop and flip
    n_digits: Optional[int] = None  # Digitclutter only
    info: dict = field(default_factory=dict)
    kind: str = "images"  # or "tokens": int64 [N, L] inputs and next-token targets, scored per token

    @property
    def sequence(self) -> bool:
        return self.kind == "tokens"

    @property
    def multilabel(self) -> bool:
        return self.n_digits is not None

    @property
    def chance_error(self) -> float:
        if self.multilabel:
            return digitclutter.chance_error(self.n_digits)
        return 1.0 - 1.0 / self.num_classes

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            # BCE summed over the 10 outputs, averaged over the batch: the gradient scale of a softmax
            # cross-entropy, so the same learning rates serve every task.
            return (
                torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]
            )
        return torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten())  # per token for [N, L, K]

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per example (per token, [N, L], for a sequence task): True if correct (top-1, or the exact digit set for
        Digitclutter). An error rate is the share of its entries that are False."""
        if self.multilabel:
            return digitclutter.exact_set_correct(logits, targets)
        return logits.argmax(dim=-1) == targets


def default_cache_dir() -> str:
    return os.environ.get("ITCONV_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "itconv-fast"))


def _split_seed(seed: int, split: str) -> int:
    # Independent streams for train and test from one user seed.
    return int(np.random.SeedSequence([seed, {"train": 0, "test": 1}[split]]).generate_state(1)[0])


def _array_digest(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


def save_digitclutter(path: str, images: torch.Tensor, labels: torch.Tensor, params: dict) -> None:
    """Writes a set atomically (temporary file, then rename) with a checksum of its arrays."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    im, lb = images.numpy(), labels.numpy()
    fd, tmp = tempfile.mkstemp(prefix=".digitclutter.", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                images=im,
                labels=lb,
                sha256=np.array(_array_digest(im, lb)),
                params=np.array(repr(sorted(params.items()))),
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_digitclutter(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads a set written by save_digitclutter; raises DatasetFilesError if it is corrupt or partial."""
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels, digest = f["images"], f["labels"], str(f["sha256"])
    # zipfile says NotImplementedError for an unknown compression method and RuntimeError for an "encrypted"
    # member: both are what a flipped header byte gives. A flipped byte in an .npy header can also stop the
    # tokenizer under numpy's header parser (tokenize.TokenError: an unclosed brace).
    except (
        OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError, SyntaxError,
        tokenize.TokenError,
    ) as exc:  # fmt: skip
        raise vision.DatasetFilesError(f"{path}: unreadable Digitclutter file ({type(exc).__name__}: {exc})") from exc
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (1, 32, 32):
        raise vision.DatasetFilesError(f"{path}: images have dtype {images.dtype} and shape {images.shape}")
    if labels.shape != (images.shape[0], 10):
        raise vision.DatasetFilesError(f"{path}: labels have shape {labels.shape}")
    if _array_digest(images, labels) != digest:
        raise vision.DatasetFilesError(f"{path}: checksum mismatch (corrupt file)")
    return torch.from_numpy(images), torch.from_numpy(labels)


def digitclutter_set(n_images: int, n_digits: int, seed: int, cache_dir: Optional[str], debris: bool = False):
    """A generated set, cached on disk under a name made of its parameters. A corrupt or partial cache
    file is detected (checksum), reported, and regenerated: never used."""
    params = dict(n_images=n_images, n_digits=n_digits, seed=seed, debris=debris, version=_GENERATOR_VERSION)
    path = None
    if cache_dir:
        name = f"digitclutter-v{_GENERATOR_VERSION}-n{n_digits}{'-debris' if debris else ''}-N{n_images}-seed{seed}.npz"
        path = os.path.join(os.path.expanduser(cache_dir), name)
        if os.path.exists(path):
            try:
                return read_digitclutter(path)
            except vision.DatasetFilesError as exc:
                warnings.warn(f"regenerating Digitclutter: {exc}", RuntimeWarning, stacklevel=2)
    images, labels = digitclutter.generate(n_images, n_digits, seed, debris=debris)
    if path:
        save_digitclutter(path, images, labels, params)
    return images, labels


def stratified_subset(targets: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Indices of a seeded subset of `size` examples with each class in proportion (largest remainders)."""
    n = targets.shape[0]
    if not 0 < size <= n:
        raise ValueError(f"subset size must be in 1..{n}, got {size}")
    gen = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(targets, return_counts=True)
    quota = counts.double() * size / n
    take = quota.floor().long()
    remainder = size - int(take.sum())
    if remainder:
        take[torch.argsort(quota - take, descending=True)[:remainder]] += 1
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = torch.nonzero(targets == c).flatten()
        chosen.append(idx[torch.randperm(idx.numel(), generator=gen)[:k]])
    return torch.sort(torch.cat(chosen)).values


def load(
    name: str = "digitclutter",
    *,
    data_dir: Optional[str] = None,
    download: bool = False,
    n_digits: int = 3,
    train_size: Optional[int] = None,
    test_size: Optional[int] = None,
    seed: int = 0,
    cache_dir: Optional[str] = None,
) -> Task:
    """Loads a task. Digitclutter is generated (and cached); digits comes with scikit-learn (its fixed,
    class-stratified split: 1,297 training and 500 test images); the others are read from data_dir.

    train_size: a seeded, class-stratified subset of the training set (sample-efficiency runs); for
    Digitclutter the number of images generated. test_size: the first test_size test images.
    Raises ValueError for an unknown name and vision.DatasetFilesError for missing or corrupt files.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    for label, value in (("train_size", train_size), ("test_size", test_size)):
        if value is not None and value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    mean, std = _STATS[name]
    if name == "digitclutter":
        if not 1 <= n_digits <= 10:
            raise ValueError(f"n_digits must be in 1..10, got {n_digits}")
        n_train = train_size or DIGITCLUTTER_SIZES["train"]
        n_test = test_size or DIGITCLUTTER_SIZES["test"]
        train = Split(*digitclutter_set(n_train, n_digits, _split_seed(seed, "train"), cache_dir))
        test = Split(*digitclutter_set(n_test, n_digits, _split_seed(seed, "test"), cache_dir))
        return Task(name, train, test, 10, 1, mean, std, augment=False, n_digits=n_digits)
    if name == "digits":
        images, labels = digits.load_digits()
        held_out = torch.zeros(len(labels), dtype=torch.bool)
        held_out[stratified_subset(labels, digits.TEST_SIZE, seed=0)] = True  # the same test set for every seed
        train, test = Split(images[~held_out], labels[~held_out]), Split(images[held_out], labels[held_out])
        classes, channels, augment = 10, 1, False
    else:
        if data_dir is None:
            raise ValueError(f"{name} needs a data directory (--data-dir)")
        if download:
            vision.download(name, data_dir)
        if name == "mnist":
            train, test = Split(*vision.load_mnist(data_dir, True)), Split(*vision.load_mnist(data_dir, False))
            classes, channels, augment = 10, 1, False
        else:
            train = Split(*vision.load_cifar(name, data_dir, True))
            test = Split(*vision.load_cifar(name, data_dir, False))
            classes, channels, augment = (10 if name == "cifar10" else 100), 3, True
    if train_size is not None and train_size < len(train):
        idx = stratified_subset(train.targets, train_size, seed)
        train = Split(train.images[idx], train.targets[idx])
    if test_size is not None and test_size < len(test):
        test = Split(test.images[:test_size], test.targets[:test_size])
    return Task(name, train, test, classes, channels, mean, std, augment=augment)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CIFAR augmentation for a whole batch: 4-pixel zero-padded random crop and horizontal flip."""
    b, _, h, w = x.shape
    pad = 4
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2)


def batches(
    task: Task,
    split: Split,
    batch_size: int,
    *,
    train: bool,
    generator: Optional[torch.Generator] = None,
    device="cpu",
    indices: Optional[torch.Tensor] = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised float batches on `device`; shuffled and augmented (CIFAR) when train=True.

    indices: iterate over these examples only (e.g. one rank's shard under DDP), in this order.
    """
    n = len(split)
    if indices is None:
        indices = torch.randperm(n, generator=generator) if train else torch.arange(n)
    if not task.sequence:
        mean = torch.tensor(task.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(task.std, device=device).view(1, -1, 1, 1)
    for start in range(0, indices.numel(), batch_size):
        idx = indices[start : start + batch_size]
        x = split.images[idx].to(device, non_blocking=True)
        if train and task.augment:
            x = _augment(x, generator)
        if not task.sequence:  # token ids go to the model as they are
            x = (x.float().div_(255.0) - mean) / std
        yield x, split.targets[idx].to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------------
# A user's data, by path: `imagefolder:DIR` and `text:FILE`.

DATA_KINDS = ("imagefolder", "text")
HELD_OUT_SHARE = 0.2  # of a single-split folder or file, held out for testing when training


def parse_data_spec(spec: str) -> tuple[str, str]:
    """("imagefolder", DIR) or ("text", FILE) from `imagefolder:DIR` / `text:FILE`; ValueError otherwise."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in DATA_KINDS or not path:
        raise ValueError(f"{spec!r}: expected imagefolder:DIR or text:FILE")
    return kind, path


def _held_out_count(n: int, where: str) -> int:
    k = max(1, round(HELD_OUT_SHARE * n))
    if n - k < 1:
        raise vision.DatasetFilesError(
            f"{where}: {n} examples, too few to hold {k} out for testing and train on the rest"
        )
    return k


def image_folder_task(root: str, prep, *, hold_out: bool) -> Task:
    """A task of a folder in ImageFolder layout (image_folder.py), at the preprocessing `prep`
    (image_folder.ImagePreprocessing). With train/ and val/: those splits. One split: with hold_out, a fixed
    class-stratified 20% (seed 0) is the test set and the rest trains; without hold_out (the measuring commands),
    the test set is val/ (or everything, for one split), and the training split is empty (train/ is not read)."""
    from .image_folder import image_folder_splits

    train, held = image_folder_splits(root, prep, with_train=hold_out)  # measuring reads the held-out split alone
    if train is not None:
        train_split, test_split = Split(train.images, train.targets), Split(held.images, held.targets)
    elif hold_out:
        test = torch.zeros(len(held.targets), dtype=torch.bool)
        test[stratified_subset(held.targets, _held_out_count(len(held.targets), root), seed=0)] = True
        train_split = Split(held.images[~test], held.targets[~test])
        test_split = Split(held.images[test], held.targets[test])
    else:
        train_split, test_split = Split(held.images[:0], held.targets[:0]), Split(held.images, held.targets)
    skipped = len(held.skipped) + (len(train.skipped) if train is not None else 0)
    info = {"classes": held.classes, "skipped_images": skipped, "path": root}
    return Task(
        f"imagefolder:{root}",
        train_split,
        test_split,
        len(held.classes),
        3,
        tuple(prep.mean),
        tuple(prep.std),
        augment=False,
        info=info,
    )


def text_task(path: str, encode, seq_len: int, vocab_size: int, *, hold_out: bool) -> Task:
    """A next-token task of a text file (text.py), tokenised by `encode`. With hold_out the last 20% of the windows
    are the test set (the text's end, so no test window overlaps a training one); without, every window is."""
    from .text import token_windows

    inputs, targets = token_windows(path, encode, seq_len)
    n = inputs.shape[0]
    k = _held_out_count(n, path) if hold_out else n
    train, test = Split(inputs[: n - k], targets[: n - k]), Split(inputs[n - k :], targets[n - k :])
    info = {"path": path, "seq_len": seq_len, "tokens": n * seq_len}
    return Task(f"text:{path}", train, test, vocab_size, 1, (), (), augment=False, info=info, kind="tokens")
