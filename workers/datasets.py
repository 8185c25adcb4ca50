"""The dataset registry: a name -> image tensors in [0, 1] and int64 labels.

Nothing downloads implicitly: torchvision datasets are read with ``download=False``
from a data root, and ``download`` runs only when a user asks for it. The evaluation
subset is a pure function of (name, n, seed), so every worker, on any node and in any
process, scores exactly the same examples, and per-example outcomes line up across jobs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.registry import Registry

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Shape and classes, plus the conventional normalisation (0/1 where none is usual)."""

    name: str
    channels: int
    height: int
    width: int
    num_classes: int
    mean: tuple
    std: tuple
    # Size of the standard test split: suites cap their ``n`` at it without loading data
    # (the submitting machine need not hold the dataset; the workers do).
    test_size: int | None = None


# A loader returns uint8-valued images (N, C, H, W) and labels (N,) for one split; the
# float conversion happens per call so a cached dataset is never mutated by a caller.
Loader = Callable[[str, Path | None], tuple[torch.Tensor, torch.Tensor]]
Downloader = Callable[[Path], None]


@dataclass(frozen=True)
class _Entry:
    info: DatasetInfo
    load: Loader
    scale: float  # pixel value that maps to 1.0
    download: Downloader | None


# The shared registry type of attacks, defenses and architectures; entries are _Entry.
DATASETS: Registry[_Entry] = Registry("dataset")


def register_dataset(
    info: DatasetInfo, load: Loader, *, scale: float = 255.0, download: Downloader | None = None
) -> None:
    """Register a dataset; built-ins use this too. ``download=None``: ships offline."""
    # Each call makes a new entry, so the registry refuses a name registered twice.
    DATASETS.add(info.name, _Entry(info, load, float(scale), download))


def dataset_names() -> list[str]:
    return DATASETS.names()


def dataset_info(name: str) -> DatasetInfo:
    return _entry(name).info


def load_split(
    name: str, split: str, data_root: str | os.PathLike | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split: x float32 (N, C, H, W) in [0, 1], y int64 (N,)."""
    x, y, scale = _raw(name, split, _root(data_root))
    return x.float() / scale, y.clone()


def eval_subset(
    name: str, n: int, seed: int, data_root: str | os.PathLike | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, indices): n test examples, the first n of a seeded permutation, sorted."""
    for field, value, low in (("n", n, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            kind = "a positive int" if low else "a non-negative int"
            raise GauntletError(f"Expected `{field}` to be {kind}, but got {value!r}")
    x, y, scale = _raw(name, "test", _root(data_root))
    size = len(y)
    if n > size:
        raise GauntletError(
            f"Expected `n` to be at most {size} (the size of the {name} test split), but got {n}"
        )
    # numpy's Generator is stable across platforms and versions for permutation, unlike
    # torch's RNG across devices, so the subset is reproducible anywhere.
    picked = np.sort(np.random.default_rng(seed).permutation(size)[:n])
    indices = torch.from_numpy(picked.astype(np.int64))
    return x[indices].float() / scale, y[indices].clone(), indices


def download(name: str, data_root: str | os.PathLike | None) -> None:
    """Fetch ``name`` into ``data_root`` (network); a no-op for datasets that ship offline."""
    entry = _entry(name)
    if entry.download is None:
        return
    root = _root(data_root)
    if root is None:
        raise GauntletError(f"dataset '{name}' needs a data root to download into")
    root.mkdir(parents=True, exist_ok=True)
    try:
        entry.download(root)
    except (OSError, RuntimeError, ValueError) as exc:  # network, checksum, disk errors
        raise GauntletError(f"could not download dataset '{name}' into {root}: {exc}") from exc
    _raw.cache_clear()  # a failed earlier load must not shadow the fresh files


def _entry(name: str) -> _Entry:
    return DATASETS.get(name)


def _root(data_root: str | os.PathLike | None) -> Path | None:
    return None if data_root is None else Path(data_root).expanduser().resolve()


@functools.lru_cache(maxsize=4)
def _raw(name: str, split: str, root: Path | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    entry = _entry(name)
    if split not in SPLITS:
        raise GauntletError(f"Expected `split` to be one of {', '.join(SPLITS)}, but got {split!r}")
    x, y = entry.load(split, root)
    return x, y.to(torch.int64), entry.scale


# --- digits: scikit-learn ships it, so tests and the embedded default need no files ---


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # integer values 0..16
    # A fixed permutation (seed 0) so the split never depends on file order or process.
    order = np.random.default_rng(0).permutation(len(images))
    return images, bunch.target.astype(np.int64), order


def _load_digits(split: str, root: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, order = _digits_arrays()
    idx = np.sort(order[:1347] if split == "train" else order[1347:])
    return torch.from_numpy(images[idx]), torch.from_numpy(labels[idx])


register_dataset(DatasetInfo("digits", 1, 8, 8, 10, (0.0,), (1.0,), 450), _load_digits, scale=16.0)


def _load_digits_28(split: str, root: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same images and split, upsampled bilinearly to MNIST's 28x28.

    At 8x8 one pixel is an eighth of the image, so spatial defenses (random resize and
    pad, quilting, JPEG's 8x8 blocks) have no room to act; at 28x28 they behave as on
    MNIST, and the data still ships offline.
    """
    small, labels = _load_digits(split, root)
    big = torch.nn.functional.interpolate(
        small.float() * (255.0 / 16.0), size=(28, 28), mode="bilinear", align_corners=False
    )
    return big.round().clamp(0, 255).to(torch.uint8), labels


register_dataset(
    DatasetInfo("digits-28", 1, 28, 28, 10, (0.0,), (1.0,), 450), _load_digits_28, scale=255.0
)


# --- torchvision datasets: read from data_root, never downloaded implicitly ---


def _open(cls_name: str, name: str, root: Path | None, **kwargs):
    import torchvision

    if root is None:
        raise GauntletError(f"dataset '{name}' needs a data root (the directory holding it)")
    try:
        return getattr(torchvision.datasets, cls_name)(str(root), download=False, **kwargs)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        raise GauntletError(
            f"dataset '{name}' not found under {root}; "
            f"run `gauntlet data download {name}` to fetch it"
        ) from exc
    except (OSError, ValueError, TypeError, KeyError) as exc:  # unreadable or damaged files
        raise GauntletError(
            f"dataset '{name}' under {root} is unreadable ({exc}); delete it and run "
            f"`gauntlet data download {name}` again"
        ) from exc


def _torchvision_dataset(
    name: str,
    cls_name: str,
    shape: tuple[int, int, int],
    classes: int,
    mean: tuple,
    std: tuple,
    test_size: int,
) -> None:
    def load(split: str, root: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        if cls_name in ("SVHN", "GTSRB"):
            ds = _open(cls_name, name, root, split=split)
        else:
            ds = _open(cls_name, name, root, train=split == "train")
        if cls_name == "GTSRB":
            return _gtsrb_arrays(ds)
        data = torch.as_tensor(ds.data)
        if data.ndim == 3:  # MNIST-like: (N, H, W)
            data = data.unsqueeze(1)
        elif cls_name.startswith("CIFAR"):  # stored (N, H, W, C)
            data = data.permute(0, 3, 1, 2)
        labels = ds.labels if cls_name == "SVHN" else ds.targets
        return data.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64)

    def fetch(root: Path) -> None:
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
        for split in SPLITS:
            if cls_name in ("SVHN", "GTSRB"):
                cls(str(root), split=split, download=True)
            else:
                cls(str(root), train=split == "train", download=True)

    register_dataset(DatasetInfo(name, *shape, classes, mean, std, test_size), load, download=fetch)


def _gtsrb_arrays(ds) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    # Images vary from 15x15 to 250x250; 32x32 is the size the literature evaluates at.
    images, labels = [], []
    for img, label in ds:
        img = img.convert("RGB").resize((32, 32), Image.BILINEAR)
        images.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
        labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


_GREY = (1, 28, 28)
_RGB = (3, 32, 32)
_torchvision_dataset("mnist", "MNIST", _GREY, 10, (0.1307,), (0.3081,), 10000)
_torchvision_dataset("fashion-mnist", "FashionMNIST", _GREY, 10, (0.2860,), (0.3530,), 10000)
_torchvision_dataset(
    "cifar10", "CIFAR10", _RGB, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10000
)
_torchvision_dataset(
    "cifar100", "CIFAR100", _RGB, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 10000
)
_torchvision_dataset(
    "svhn", "SVHN", _RGB, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 26032
)
_torchvision_dataset(
    "gtsrb", "GTSRB", _RGB, 43, (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669), 12630
)


# ImageNet lives in its own module (ImageFolder reading and preprocessing); importing it
# here registers it with the built-ins. At the end: it imports this module's names.
from gauntlet.workers import imagenet as _imagenet  # noqa: E402, F401
