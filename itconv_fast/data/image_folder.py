"""A user's images, in torchvision's ImageFolder layout, as in-memory uint8 tensors at a model's input size.

    root/train/<class>/*.png, root/val/<class>/*.png      (or: root/<class>/*.png, one split)

Each image is decoded once (PIL), resized so its shorter side is `resize` and centre-cropped to `size` (the eval
transform of timm's data config and of torchvision's weights: `ImagePreprocessing`); the model's mean and std are
applied per batch, as for the paper's data sets. An image that cannot be read is counted and skipped, with one
warning for the whole folder (never a traceback). Class folders and file extensions are torchvision's
(`torchvision.datasets.folder`), so a folder that works with ImageFolder works here.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .vision import DatasetFilesError

__all__ = [
    "ImagePreprocessing",
    "FolderImages",
    "read_image_folder",
    "image_folder_splits",
    "folder_classes",
    "HELD_OUT_SPLITS",
    "write_image_folder",
]

HELD_OUT_SPLITS = ("val", "validation", "test")  # the names of the split measured on, beside train/
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImagePreprocessing:
    """The eval transform of a model's images: shorter side to `resize`, centre crop to `size` x `size`, RGB, then
    (per batch) (x / 255 - mean) / std."""

    size: int
    resize: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bilinear"  # or "bicubic", "nearest"

    def __post_init__(self) -> None:
        if self.size < 1 or self.resize < self.size:
            raise ValueError(
                f"image preprocessing: need 1 <= size <= resize, got size {self.size}, resize {self.resize}"
            )
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"image preprocessing: unknown interpolation {self.interpolation!r}")

    def with_size(self, size: int) -> "ImagePreprocessing":
        """The same transform at another crop size (the resize keeps its ratio to the crop)."""
        return ImagePreprocessing(
            size, max(size, round(size * self.resize / self.size)), self.mean, self.std, self.interpolation
        )


class FolderImages(NamedTuple):
    images: torch.Tensor  # uint8 [N, 3, size, size]
    targets: torch.Tensor  # int64 [N], indices into classes
    classes: list
    skipped: list  # (path, reason) of the images that could not be read


def _torchvision_folder():
    try:
        from torchvision.datasets import folder
    except ImportError:
        raise ImportError("reading an image folder needs torchvision (pip install torchvision)") from None
    return folder


def _decode(path: str, prep: ImagePreprocessing) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    with Image.open(path) as image:
        image = image.convert("RGB")  # decodes the whole file: a truncated one fails here
    mode = InterpolationMode(prep.interpolation)
    image = F.center_crop(F.resize(image, prep.resize, interpolation=mode, antialias=True), prep.size)
    return F.pil_to_tensor(image)


def read_image_folder(root: str, prep: ImagePreprocessing, classes: Optional[list] = None) -> FolderImages:
    """The images under root/<class>/ (classes: the class names to expect, e.g. those of the train split).
    Raises DatasetFilesError naming the folder when it is missing, holds no class folder or no readable image, or
    has other classes than expected."""
    folder = _torchvision_folder()
    if not os.path.isdir(root):
        raise DatasetFilesError(f"{root}: no such directory")
    try:
        found, _ = folder.find_classes(root)
    except (FileNotFoundError, OSError) as exc:
        raise DatasetFilesError(f"{root}: no class folders ({exc})") from None
    if classes is not None and found != list(classes):
        raise DatasetFilesError(f"{root}: its classes {found} differ from the training split's {list(classes)}")
    class_to_idx = {name: i for i, name in enumerate(found)}
    samples = folder.make_dataset(root, class_to_idx, extensions=folder.IMG_EXTENSIONS, allow_empty=True)
    images, targets, skipped = [], [], []
    for path, target in samples:
        try:
            images.append(_decode(path, prep))
        except (OSError, ValueError, SyntaxError) as exc:  # PIL: UnidentifiedImageError is an OSError
            skipped.append((path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            continue
        targets.append(target)
    if skipped:
        path, reason = skipped[0]
        warnings.warn(
            f"{root}: skipped {len(skipped)} of {len(samples)} images that could not be read (first: {path}: {reason})",
            RuntimeWarning,
            stacklevel=2,
        )
    if not images:
        raise DatasetFilesError(f"{root}: no readable image (extensions {', '.join(folder.IMG_EXTENSIONS)})")
    return FolderImages(torch.stack(images), torch.tensor(targets, dtype=torch.int64), found, skipped)


def folder_classes(root: str) -> list:
    """The class names of a folder (of its train/ split when it has one), without reading an image."""
    folder = _torchvision_folder()
    if not os.path.isdir(root):
        raise DatasetFilesError(f"{root}: no such directory")
    train_dir = os.path.join(root, "train")
    try:
        return folder.find_classes(train_dir if os.path.isdir(train_dir) else root)[0]
    except (FileNotFoundError, OSError) as exc:
        raise DatasetFilesError(f"{root}: no class folders ({exc})") from None


def image_folder_splits(
    root: str, prep: ImagePreprocessing, *, with_train: bool = True
) -> tuple[Optional[FolderImages], FolderImages]:
    """(train, held out) of a folder with train/ and val/ (or validation/, test/), or (None, everything) for a
    folder of class folders alone. with_train=False reads the held-out split alone (train is then None)."""
    held_out = next((os.path.join(root, n) for n in HELD_OUT_SPLITS if os.path.isdir(os.path.join(root, n))), None)
    train_dir = os.path.join(root, "train")
    if os.path.isdir(train_dir):
        if held_out is None:
            raise DatasetFilesError(f"{root}: has train/ but no {'/, '.join(HELD_OUT_SPLITS)}/ beside it")
        classes = folder_classes(root)
        train = read_image_folder(train_dir, prep) if with_train else None
        return train, read_image_folder(held_out, prep, classes=classes)
    return None, read_image_folder(root, prep)


def write_image_folder(root: str, images: torch.Tensor, targets: torch.Tensor, classes: list) -> None:
    """Writes uint8 [N, C, H, W] images as PNG files root/<class>/<index>.png (ImageFolder layout), each file
    atomically (a temporary name, then a rename)."""
    from PIL import Image

    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
    for i, (image, target) in enumerate(zip(images, targets.tolist())):
        array = image.permute(1, 2, 0).numpy()
        picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        path = os.path.join(root, classes[target], f"{i:06d}.png")
        picture.save(path + ".tmp", format="PNG")
        os.replace(path + ".tmp", path)
