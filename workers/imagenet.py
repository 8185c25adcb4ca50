"""ImageNet (ILSVRC 2012) read from an ImageFolder under the data root.

Layout: ``DATA_ROOT/imagenet/val/<wnid>/*.JPEG`` (the test split) and
``DATA_ROOT/imagenet/train/<wnid>/*.JPEG``; class indices are the sorted wnids, the
convention torchvision's and timm's pretrained weights use. Preprocessing is the
standard one (RobustBench's ``Res256Crop224``): shorter side resized to 256, bilinear
with antialiasing, then a 224x224 centre crop, kept as uint8 until an evaluation asks.

The test split is a fixed 5,000-image subset, 5 per class: in each class, the files
whose names hash lowest under sha256. It is the same on every machine whatever order
the filesystem lists files in, and balanced over classes; evaluation subsets (``n``,
``seed``) are then drawn from it like any other test split. The train split is capped
the same way (10 per class) because it exists only for the attacks and defenses that
fit on training data (universal perturbations, DkNN's index); the full 1.28M images
would not fit in memory as one tensor.

ImageNet cannot be downloaded automatically: its licence requires an account.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.datasets import DatasetInfo, register_dataset

FOLDER = "imagenet"
PER_CLASS = {"test": 5, "train": 10}
RESIZE, CROP = 256, 224
EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
# Decoding is mostly in C with the GIL released: a few threads keep the cores busy.
DECODE_THREADS = 8


def split_folder(root: Path | None, split: str) -> Path:
    if root is None:
        raise GauntletError("dataset 'imagenet' needs a data root (the directory holding it)")
    folder = root / FOLDER / ("val" if split == "test" else "train")
    if not folder.is_dir():
        raise GauntletError(
            f"dataset 'imagenet' not found: expected an ImageFolder at {folder} "
            "(one directory per class wnid holding its images)"
        )
    return folder


def _name_hash(path: Path) -> str:
    return hashlib.sha256(path.name.encode()).hexdigest()


def chosen_files(folder: Path, per_class: int) -> list[tuple[Path, int]]:
    """(file, class index) of the ``per_class`` lowest-hashing images of every class."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise GauntletError(f"dataset 'imagenet': no class directories under {folder}")
    chosen = []
    for label, wnid in enumerate(classes):
        images = [p for p in (folder / wnid).iterdir() if p.suffix.lower() in EXTENSIONS]
        for path in sorted(images, key=_name_hash)[:per_class]:
            chosen.append((path, label))
    return chosen


def preprocess(path: Path) -> np.ndarray:
    """uint8 (3, 224, 224): shorter side to 256, centre crop 224 (RobustBench's recipe)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            width, height = img.size
            # torchvision's Resize(256) arithmetic: the long side is truncated, not rounded.
            if width <= height:
                size = (RESIZE, int(RESIZE * height / width))
            else:
                size = (int(RESIZE * width / height), RESIZE)
            if size != img.size:
                img = img.resize(size, Image.BILINEAR)
            left = int(round((size[0] - CROP) / 2.0))
            top = int(round((size[1] - CROP) / 2.0))
            img = img.crop((left, top, left + CROP, top + CROP))
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise GauntletError(f"dataset 'imagenet': cannot read image {path}: {exc}") from exc


def load(split: str, root: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    files = chosen_files(split_folder(root, split), PER_CLASS[split])
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        images = list(pool.map(preprocess, [path for path, _ in files]))
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return torch.from_numpy(np.stack(images)), labels


def refuse_download(root: Path) -> None:
    raise GauntletError(
        "ImageNet cannot be downloaded automatically (its licence needs an account at "
        f"image-net.org); put the ILSVRC 2012 train and val ImageFolders under {root / FOLDER}"
    )


register_dataset(
    DatasetInfo(
        "imagenet",
        3,
        CROP,
        CROP,
        1000,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        PER_CLASS["test"] * 1000,
    ),
    load,
    download=refuse_download,
)
