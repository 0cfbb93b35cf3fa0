"""Fashion-MNIST (Xiao et al. 2017) through torchvision, scaled to [-1, 1], online or offline.

Where the files come from, in order:
1. an explicit ``root`` or the ``DDPM_DATA_DIR`` environment variable;
2. Debian's package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
3. torchvision's normal download (Colab, any machine with internet).

A folder of ``*-idx?-ubyte.gz`` files (1 or 2) is decompressed into
``<cache>/FashionMNIST/raw/``. Copying the .gz files would not do: Debian
recompressed them, their md5 differs from torchvision's list, and torchvision
would try to download again. It only needs the uncompressed idx files.
"""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import torch

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Mean and std of the training pixels in [0, 1], a fingerprint of the real data.
TRAIN_MEAN, TRAIN_STD = 0.2860, 0.3530


class DataNotFoundError(RuntimeError):
    """Fashion-MNIST could be found neither locally nor by download."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddpm_tutorial"


def _has_raw(root: Path) -> bool:
    raw = root / "FashionMNIST" / "raw"
    return all((raw / name).exists() for name in IDX_FILES)


def _gz_folder(folder: Path) -> bool:
    return all((folder / f"{name}.gz").exists() for name in IDX_FILES)


def _decompress_into(src: Path, root: Path) -> None:
    """Decompress src/*.gz into root/FashionMNIST/raw/, atomically per file."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        dest = raw / name
        if dest.exists():
            continue
        tmp = dest.with_suffix(".tmp")
        with gzip.open(src / f"{name}.gz", "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, dest)


def prepare_root(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Return a folder from which torchvision.datasets.FashionMNIST loads without downloading,
    or, if none is found, a cache folder where it may download (only when ``download``)."""
    candidates = []
    if root is not None:
        candidates.append(("root argument", Path(root)))
    elif os.environ.get("DDPM_DATA_DIR"):
        candidates.append(("DDPM_DATA_DIR", Path(os.environ["DDPM_DATA_DIR"])))
    candidates.append(("Debian package dataset-fashion-mnist", DEBIAN_DIR))
    cache = default_cache_dir()

    for _, folder in candidates:
        if _has_raw(folder):
            return folder
        if _gz_folder(folder):   # never write into a system folder such as Debian's
            target = folder if folder != DEBIAN_DIR and os.access(folder, os.W_OK) else cache
            _decompress_into(folder, target)
            return target
    if _has_raw(cache):
        return cache
    if not download:
        raise DataNotFoundError(_missing_message(candidates))
    return cache


def _missing_message(candidates) -> str:
    looked = "; ".join(f"{why}: {path}" for why, path in candidates)
    return ("Fashion-MNIST was not found and could not be downloaded. Looked in: " + looked + ". "
            "Get it one of three ways: (1) set DDPM_DATA_DIR (or pass root=) to a folder holding "
            "the four *-idx?-ubyte[.gz] files or torchvision's FashionMNIST/raw/ layout; "
            "(2) on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist; "
            "(3) connect to the internet and torchvision downloads it.")


def load_fashion_mnist(train: bool = True, root: str | os.PathLike | None = None,
                       subset: int = 0, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """All images as one tensor: (N, 1, 28, 28) float32 in [-1, 1], labels (N,) int64.

    A tensor in memory (47 MB for the training split) is faster to batch on a
    2-core laptop than a DataLoader that converts PIL images one by one.
    ``subset=N`` keeps the first N images (0 keeps all).
    """
    from torchvision.datasets import FashionMNIST

    folder = prepare_root(root, download=download)
    try:
        ds = FashionMNIST(str(folder), train=train, download=download and not _has_raw(folder))
    except (RuntimeError, OSError) as err:   # torchvision: "Dataset not found", or no network
        raise DataNotFoundError(_missing_message([("download to", folder)]) + f" ({err})") from err
    x = ds.data[:, None].float() / 127.5 - 1.0        # (N, 1, 28, 28): uint8 [0, 255] -> [-1, 1]
    y = ds.targets.long()
    if subset < 0:
        raise ValueError(f"subset must be >= 0, got {subset}")
    if subset:
        x, y = x[:subset], y[:subset]
    return x, y


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, for display and for the metric."""
    return ((x + 1) / 2).clamp(0, 1)
