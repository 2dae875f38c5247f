"""MNIST, CIFAR-10 and CIFAR-100 from their standard files, with verified download.

The files are looked for in the layouts torchvision uses, so existing downloads work:

    DATA_DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]   (or directly in DATA_DIR)
    DATA_DIR/cifar-10-batches-py/{data_batch_1..5,test_batch}             (or cifar-10-python.tar.gz)
    DATA_DIR/cifar-100-python/{train,test}                                  (or cifar-100-python.tar.gz)

Images come back as uint8 tensors [N, C, H, W], labels as int64 [N].
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DatasetFilesError", "Resource", "RESOURCES", "load_mnist", "load_cifar", "download", "md5sum"]


class DatasetFilesError(Exception):
    """A data set's files are missing, truncated, corrupt or fail their checksum."""


@dataclass(frozen=True)
class Resource:
    filename: str
    url: str
    md5: str


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
RESOURCES: dict[str, list[Resource]] = {
    "mnist": [
        Resource(
            "train-images-idx3-ubyte.gz", _MNIST_URL + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"
        ),
        Resource(
            "train-labels-idx1-ubyte.gz", _MNIST_URL + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"
        ),
        Resource(
            "t10k-images-idx3-ubyte.gz", _MNIST_URL + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"
        ),
        Resource(
            "t10k-labels-idx1-ubyte.gz", _MNIST_URL + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"
        ),
    ],
    "cifar10": [
        Resource(
            "cifar-10-python.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
        ),
    ],
    "cifar100": [
        Resource(
            "cifar-100-python.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "eb9058c3a382ffc7106e4002c42a8d85",
        ),
    ],
}


def md5sum(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download(name: str, data_dir: str, *, timeout: float = 60.0) -> list[str]:
    """Fetches a data set's official archives into data_dir (MNIST into data_dir/MNIST/raw) and verifies
    each md5. A file already present with the right checksum is kept. A checksum mismatch or a truncated
    transfer raises DatasetFilesError naming the file; the bad download is deleted, never used."""
    if name not in RESOURCES:
        raise ValueError(f"no download for data set {name!r}; known: {sorted(RESOURCES)}")
    target = os.path.join(data_dir, "MNIST", "raw") if name == "mnist" else data_dir
    os.makedirs(target, exist_ok=True)
    paths = []
    for res in RESOURCES[name]:
        path = os.path.join(target, res.filename)
        if os.path.exists(path) and md5sum(path) == res.md5:
            paths.append(path)
            continue
        fd, part = tempfile.mkstemp(prefix=res.filename + ".", suffix=".part", dir=target)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(res.url, timeout=timeout) as response:
                expected = response.headers.get("Content-Length")
                received = 0
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    received += len(block)
            if expected is not None and received != int(expected):
                raise DatasetFilesError(
                    f"{res.filename}: download truncated ({received} of {expected} bytes) from {res.url}"
                )
            actual = md5sum(part)
            if actual != res.md5:
                raise DatasetFilesError(
                    f"{res.filename}: md5 {actual} does not match the expected {res.md5} (from {res.url}); file "
                    "discarded"
                )
            os.replace(part, path)
        except OSError as exc:
            raise DatasetFilesError(f"{res.filename}: download from {res.url} failed ({exc})") from exc
        finally:
            if os.path.exists(part):
                os.remove(part)
        paths.append(path)
    return paths


def _missing(name: str, looked: list[str], expected: list[str]) -> DatasetFilesError:
    return DatasetFilesError(
        f"{name} files not found. Looked in: {', '.join(looked)}. Expected: {', '.join(expected)}. "
        "Pass --download to fetch the official archives (checksums verified)."
    )


# ---------------------------------------------------------------------------------------------
# MNIST (IDX)
# ---------------------------------------------------------------------------------------------

_IDX_UBYTE = 0x08


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (raw or .gz) of unsigned bytes, checking its header against its length."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetFilesError(f"{path}: cannot read ({exc})") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetFilesError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != _IDX_UBYTE:
        raise DatasetFilesError(f"{path}: IDX element type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DatasetFilesError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(shape)):
        raise DatasetFilesError(
            f"{path}: IDX header promises shape {shape} but the file holds {len(data) - header} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if train else "t10k"
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    folders = [os.path.join(data_dir, "MNIST", "raw"), data_dir]
    found = []
    for name in names:
        candidates = [os.path.join(d, name + ext) for d in folders for ext in ("", ".gz")]
        path = next((c for c in candidates if os.path.exists(c)), None)
        if path is None:
            raise _missing("MNIST", folders, [n + "[.gz]" for n in names])
        found.append(path)
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetFilesError(f"{found[0]}, {found[1]}: shapes {images.shape} and {labels.shape} do not pair up")
    if labels.max(initial=0) > 9:
        raise DatasetFilesError(f"{found[1]}: labels outside 0..9")
    return torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# CIFAR (python pickles)
# ---------------------------------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's batches contain (dicts, lists, numpy arrays): never arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        obj = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means a corrupt or foreign file
        raise DatasetFilesError(f"{where}: not a valid CIFAR batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DatasetFilesError(f"{where}: not a valid CIFAR batch (a {type(obj).__name__}, not a dict)")
    return obj


_CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        key=b"labels",
        classes=10,
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=["train"],
        test=["test"],
        key=b"fine_labels",
        classes=100,
    ),
}


def _parse_cifar_batch(batch: dict, key: bytes, classes: int, where: str):
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[key], dtype=np.int64)
    except KeyError as exc:
        raise DatasetFilesError(f"{where}: CIFAR batch lacks the entry {exc}") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DatasetFilesError(f"{where}: CIFAR batch has data {data.shape} and labels {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DatasetFilesError(f"{where}: labels outside 0..{classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _CIFAR[name]
    members = spec["train" if train else "test"]
    folder = os.path.join(data_dir, spec["folder"])
    archive = os.path.join(data_dir, spec["archive"])
    raws = []
    if all(os.path.exists(os.path.join(folder, m)) for m in members):
        for m in members:
            with open(os.path.join(folder, m), "rb") as f:
                raws.append((f.read(), os.path.join(folder, m)))
    elif os.path.exists(archive):
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for m in members:
                    member = tar.extractfile(f"{spec['folder']}/{m}")
                    if member is None:
                        raise KeyError(m)
                    raws.append((member.read(), f"{archive}:{spec['folder']}/{m}"))
        except KeyError as exc:
            raise DatasetFilesError(f"{archive}: lacks {spec['folder']}/{exc.args[0]}") from exc
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:  # zlib.error: corrupt deflate data
            raise DatasetFilesError(f"{archive}: corrupt or truncated archive ({exc})") from exc
    else:
        raise _missing(
            name.upper().replace("CIFAR", "CIFAR-"),
            [folder, data_dir],
            [f"{spec['folder']}/{{{','.join(members)}}}", spec["archive"]],
        )
    parts = [_parse_cifar_batch(_unpickle(raw, where), spec["key"], spec["classes"], where) for raw, where in raws]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)
