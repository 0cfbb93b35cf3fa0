"""The training images: Fashion-MNIST (Xiao et al. 2017) through torchvision, scaled to [-1, 1],
online or offline. (A folder of your own images: image_folder.py.)

Where the files come from, in order:
1. an explicit ``root`` (the CLI's ``--data``) or the ``DDPM_DATA_DIR`` environment variable.
   A folder named this way must hold the data: if it does not, that is an error naming
   what is missing, never a silent fall-back to another copy;
2. Debian's package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
3. torchvision's normal download (Colab, any machine with internet).

A folder holds the data when it has the four idx files, each either uncompressed, as
``.gz``, or in torchvision's ``FashionMNIST/raw/`` layout. Files that are not already
in that layout are decompressed (or copied) into ``<root>/FashionMNIST/raw/`` (the folder
itself when writable, else a cache folder). Copying the Debian .gz files would not do:
Debian recompressed them, their md5 differs from torchvision's list, and torchvision
would try to download again. It only needs the uncompressed idx files.

Every idx file is checked (magic number, shape, length) before torchvision reads it, so
a corrupt or truncated file is reported as "found but corrupt", with what to do.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import struct
import zlib
from pathlib import Path

import torch

from .checks import to_unit  # noqa: F401  ([-1, 1] -> [0, 1]; the chapters import it from here)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Mean and std of the training pixels in [0, 1], a fingerprint of the real data.
TRAIN_MEAN, TRAIN_STD = 0.2860, 0.3530
# idx header: a magic number 0x0000 08 0D (unsigned bytes, D dimensions), then D sizes.
_IDX_SHAPES = {"train-images-idx3-ubyte": (60000, 28, 28), "train-labels-idx1-ubyte": (60000,),
               "t10k-images-idx3-ubyte": (10000, 28, 28), "t10k-labels-idx1-ubyte": (10000,)}
_REINSTALL = ("reinstall it (sudo apt-get install --reinstall dataset-fashion-mnist) or download "
              "Fashion-MNIST again (https://github.com/zalandoresearch/fashion-mnist)")


class DataNotFoundError(RuntimeError):
    """Fashion-MNIST could be found neither locally nor by download, or a folder named
    explicitly (``root`` / ``--data`` / ``DDPM_DATA_DIR``) does not hold it."""


class DataCorruptError(RuntimeError):
    """A Fashion-MNIST file was found but is corrupt or truncated."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddpm_tutorial"


def _raw(root: Path) -> Path:
    return root / "FashionMNIST" / "raw"


def _has_raw(root: Path) -> bool:
    return all((_raw(root) / name).is_file() for name in IDX_FILES)


def _source_file(folder: Path, name: str) -> Path | None:
    """Where ``folder`` holds idx file ``name``: uncompressed or .gz, flat or in FashionMNIST/raw/."""
    for path in (_raw(folder) / name, folder / name, folder / f"{name}.gz", _raw(folder) / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def _corrupt(path: Path, problem: str, fix: str) -> DataCorruptError:
    return DataCorruptError(f"Fashion-MNIST file {path} was found but is corrupt: {problem}. To fix: {fix}")


def _stage_into(sources: dict, root: Path) -> set:
    """Decompress (or copy) each source file to root/FashionMNIST/raw/<name>, atomically per file;
    files already there are kept (they are checked afterwards). Returns the names written now."""
    raw = _raw(root)
    raw.mkdir(parents=True, exist_ok=True)
    fresh = set()
    for name, src in sources.items():
        dest = raw / name
        if dest.exists() or src == dest:
            continue
        tmp = dest.with_name(f".{name}.tmp")
        try:
            with (gzip.open(src, "rb") if src.suffix == ".gz" else open(src, "rb")) as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            os.replace(tmp, dest)
            fresh.add(name)
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:   # truncated or not gzip at all
            raise _corrupt(src, f"it does not decompress ({type(err).__name__}: {err})",
                           f"replace it with a good copy: {_REINSTALL}") from err
        finally:
            tmp.unlink(missing_ok=True)
    return fresh


def _idx_problem(path: Path, name: str) -> str | None:
    """What is wrong with idx file ``path`` (header and length), or None. Reads 16 bytes."""
    shape = _IDX_SHAPES[name]
    header = 4 + 4 * len(shape)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(header)
    if head[:2] == b"\x1f\x8b":
        return "it is still gzip-compressed (an idx file is expected here)"
    if len(head) < header:
        return f"it has {size} bytes, less than an idx header"
    magic, *dims = struct.unpack(f">{1 + len(shape)}I", head)
    if magic != 0x0800 + len(shape):
        return f"wrong magic number {magic:#010x}, expected {0x0800 + len(shape):#010x} (not an idx file of bytes)"
    if tuple(dims) != shape:
        return f"its header says shape {tuple(dims)}, expected {shape}"
    if size != header + math.prod(shape):
        return (f"it has {size} bytes, expected {header + math.prod(shape)} "
                f"({'truncated' if size < header + math.prod(shape) else 'extra bytes at the end'})")
    return None


def _check_raw(root: Path, origins: dict | None = None, fresh: set = frozenset()) -> None:
    """Raise DataCorruptError for the first bad idx file in root/FashionMNIST/raw/. ``origins``
    maps a file name to the file it was decompressed from (None: the file is the user's own);
    ``fresh`` names the files decompressed just now (then the source itself is bad)."""
    for name in IDX_FILES:
        path = _raw(root) / name
        problem = _idx_problem(path, name)
        if not problem:
            continue
        origin = (origins or {}).get(name, "cache")
        if name in fresh and origin not in (None, "cache"):
            path.unlink()                  # so that a good replacement is decompressed next time
            raise _corrupt(origin, f"it decompresses to a bad idx file: {problem}",
                           f"replace it with a good copy: {_REINSTALL}")
        if origin is None:
            fix = f"replace it with a good copy: {_REINSTALL}"
        elif origin == "cache":
            source = DEBIAN_DIR if DEBIAN_DIR.is_dir() else "the download"
            fix = (f"delete the cached copy at {path} and run again (it is made again from {source}); "
                   f"if it fails again, {_REINSTALL}")
        else:
            fix = (f"delete {path} and run again: it is decompressed again from {origin}; "
                   f"if it fails again, {origin} itself is bad: {_REINSTALL}")
        raise _corrupt(path, problem, fix)


def _named_folder(why: str, folder: Path, cache: Path) -> Path:
    """The root torchvision reads for a folder the user named; DataNotFoundError if it lacks the data."""
    hint = ("give a folder holding the four Fashion-MNIST files train-images-idx3-ubyte, "
            "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (.gz or not), or "
            + ("unset DDPM_DATA_DIR" if why == "DDPM_DATA_DIR" else "leave out --data / root=")
            + " to use the Debian package or the download")
    if not folder.is_dir():
        raise DataNotFoundError(f"the data folder {folder} ({why}) "
                                f"{'is a file' if folder.exists() else 'does not exist'}: {hint}")
    sources = {name: _source_file(folder, name) for name in IDX_FILES}
    missing = [name for name, src in sources.items() if src is None]
    if missing:
        raise DataNotFoundError(f"the data folder {folder} ({why}) does not hold Fashion-MNIST: "
                                + (f"missing {', '.join(missing)} (.gz or not); " if len(missing) < len(IDX_FILES)
                                   else "none of its files are there; ") + hint)
    # Decompress next to the files when we may write there, else into a cache folder of this
    # source's own (Debian's copy goes where it always goes; no two sources share a folder).
    if folder.resolve() == DEBIAN_DIR.resolve():
        target = cache
    elif os.access(folder, os.W_OK) or _has_raw(folder):
        target = folder
    else:
        target = cache / "copies" / hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
    fresh = _stage_into(sources, target)
    # A bad file in raw/ that was decompressed from a file beside it is fixed by deleting it.
    origins = {name: next((p for p in (folder / name, folder / f"{name}.gz", _raw(folder) / f"{name}.gz")
                           if p.is_file() and p != _raw(target) / name), None) for name in IDX_FILES}
    _check_raw(target, origins, fresh)
    return target


def prepare_root(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Return a folder from which torchvision.datasets.FashionMNIST loads without downloading,
    or, if none is found, a cache folder where it may download (only when ``download``).
    Raises DataNotFoundError when a named folder lacks the data (or, without ``download``,
    when there is none anywhere) and DataCorruptError when a file found is damaged."""
    cache = default_cache_dir()
    if root is not None:
        return _named_folder("--data / root=", Path(root), cache)
    if os.environ.get("DDPM_DATA_DIR"):
        return _named_folder("DDPM_DATA_DIR", Path(os.environ["DDPM_DATA_DIR"]), cache)
    if _has_raw(cache):
        _check_raw(cache)
        return cache
    debian = {name: DEBIAN_DIR / f"{name}.gz" for name in IDX_FILES}
    if all(p.is_file() for p in debian.values()):   # never write into the system folder
        fresh = _stage_into(debian, cache)
        _check_raw(cache, debian, fresh)
        return cache
    if not download:
        raise DataNotFoundError(_missing_message(cache))
    return cache


def _missing_message(cache: Path, err: Exception | None = None) -> str:
    return ("Fashion-MNIST was not found and could not be downloaded"
            + (f" ({type(err).__name__}: {err})" if err else "")
            + f". Looked in: DDPM_DATA_DIR (not set); Debian package dataset-fashion-mnist: {DEBIAN_DIR}; "
            f"the cache: {cache}. Get it one of three ways: (1) set DDPM_DATA_DIR (or pass --data / root=) "
            "to a folder holding the four *-idx?-ubyte[.gz] files or torchvision's FashionMNIST/raw/ layout; "
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

    if subset < 0:
        raise ValueError(f"subset must be >= 0, got {subset}")
    folder = prepare_root(root, download=download)
    found = _has_raw(folder)
    try:
        ds = FashionMNIST(str(folder), train=train, download=download and not found)
    except (RuntimeError, OSError) as err:   # torchvision: "Dataset not found", or no network
        raise DataNotFoundError(_missing_message(folder, err)) from err
    x = ds.data[:, None].float() / 127.5 - 1.0        # (N, 1, 28, 28): uint8 [0, 255] -> [-1, 1]
    y = ds.targets.long()
    if subset:
        x, y = x[:subset], y[:subset]
    return x, y
