"""The training images: Fashion-MNIST (Xiao et al. 2017) through torchvision, scaled to [-1, 1],
online or offline; and a folder of your own images (:class:`ImageFolder`, at the end).

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

import numpy as np
import torch

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


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, for display and for the metric."""
    return ((x + 1) / 2).clamp(0, 1)


# --- your own images -----------------------------------------------------------------------------
#
# A folder of PNG / JPEG files, searched recursively. torchvision's ImageFolder layout
# (root/<class>/<image>) is the special case where every image lies in a first-level
# subfolder: the subfolder names, sorted, are then the classes (for train --conditional).
# Each image is resized so its shorter side is image_size and center-cropped to a square
# (PIL's ImageOps.fit, bicubic), converted to ``channels`` and scaled to [-1, 1] exactly like
# Fashion-MNIST. Decisions, stated in the errors too:
# - unreadable files (not an image, truncated, a mode PIL cannot convert) are SKIPPED and
#   counted, the count and the first one printed; only a folder with none left is an error.
#   A file whose header reads but whose pixels do not, met while streaming, stops the run
#   with its name (delete it and resume): a fixed batch cannot silently lose a member.
# - mixed modes: grey and colour images in one folder are REFUSED for a colour model
#   (channels=3): the network would learn "grey" as a mode of the data, which is rarely
#   wanted. For a grey model (channels=1) colour images are converted to luminance
#   (L = 0.299 R + 0.587 G + 0.114 B), as intended. Alpha is dropped; palette images are colour.

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
GREY_MODES = frozenset({"1", "L", "LA", "I;16", "I;16B", "I;16L", "La"})   # every other PIL mode: colour
# A folder whose float32 tensor fits in this many bytes is decoded once into memory (the
# fast path Fashion-MNIST uses); a larger one is streamed from disk by a DataLoader.
IN_MEMORY_BYTES = 2 * 2 ** 30


class ImageFolderError(ValueError):
    """A folder of images cannot be trained on: missing, empty, unreadable, or mixed modes."""


def find_images(root) -> list:
    """Every .png / .jpg / .jpeg under ``root`` (any depth, any case), sorted: the order, and so
    every seeded batch, is the same on every machine and every rank. Hidden files are left out."""
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"the image folder {root} {'is a file' if root.exists() else 'does not exist'}; "
                               "give a folder holding .png / .jpg images (any depth of subfolders)")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _open_header(path: Path) -> str:
    """The PIL mode of ``path``, reading only its header (fast); raises on a file PIL cannot read."""
    from PIL import Image
    with Image.open(path) as im:
        return im.mode


def load_image(path, image_size: int, channels: int) -> torch.Tensor:
    """One image file -> (channels, image_size, image_size) float32 in [-1, 1]:
    shorter side resized to image_size (bicubic), center crop, grey (L) or RGB."""
    from PIL import Image, ImageOps
    with Image.open(path) as im:
        if im.mode.startswith("I;16"):                  # 16-bit grey: scale to 8 bits (convert would clip)
            im = Image.fromarray((np.asarray(im, dtype=np.float32) / 257.0).round().astype(np.uint8))
        im = im.convert("L" if channels == 1 else "RGB")
        im = ImageOps.fit(im, (image_size, image_size), method=Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0   # (C, S, S)


class ImageFolder(torch.utils.data.Dataset):
    """A folder of images as a Dataset: item i is image i as (C, S, S) float32 in [-1, 1].

    ``channels``: 1 (grey) or 3 (RGB); None picks 3 when any image is colour, else 1.
    ``labels``: (N,) int64 class indices in the ImageFolder layout, else None.
    ``skipped``: [(path, reason)] of the files that could not be read (left out).
    Scanning reads each file's header only; pixels are decoded in :meth:`__getitem__`."""

    def __init__(self, root, image_size: int = 32, channels: int | None = None, log=print):
        if channels not in (None, 1, 3):
            raise ImageFolderError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        if not isinstance(image_size, int) or image_size < 8:
            raise ImageFolderError(f"image_size must be an integer >= 8, got {image_size}")
        self.root, self.image_size = Path(root), image_size
        candidates = find_images(self.root)
        if not candidates:
            raise ImageFolderError(f"the image folder {self.root} holds no .png / .jpg / .jpeg images "
                                   "(searched every subfolder); put your images there")
        self.paths, modes, self.skipped = [], [], []
        for path in candidates:
            try:
                mode = _open_header(path)
                if mode in ("I", "F"):
                    raise ValueError(f"32-bit {'integer' if mode == 'I' else 'float'} pixels are not supported")
            except Exception as err:                 # PIL raises many kinds: UnidentifiedImageError, OSError, ...
                self.skipped.append((path, f"{type(err).__name__}: {err}"))
                continue
            self.paths.append(path)
            modes.append(mode)
        if self.skipped:
            log(f"skipped {len(self.skipped)} of {len(candidates)} files in {self.root} that are not readable "
                f"images (first: {self.skipped[0][0]}: {self.skipped[0][1]})")
        if not self.paths:
            raise ImageFolderError(f"none of the {len(candidates)} image files in {self.root} could be read "
                                   f"(first: {self.skipped[0][0]}: {self.skipped[0][1]})")
        grey = [p for p, m in zip(self.paths, modes) if m in GREY_MODES]
        colour = [p for p, m in zip(self.paths, modes) if m not in GREY_MODES]
        self.channels = channels or (3 if colour else 1)
        if self.channels == 3 and grey and colour:
            raise ImageFolderError(
                f"the image folder {self.root} mixes {len(grey)} greyscale images (first: {grey[0]}) with "
                f"{len(colour)} colour ones (first: {colour[0]}); a colour model would learn grey as a kind of "
                "image. Convert the grey ones to RGB (or remove them), or train a grey model with --channels 1")
        self.classes, self.labels = self._classes()

    def _classes(self):
        """ImageFolder layout (every image in a first-level subfolder): sorted subfolder names
        and each image's index among them; otherwise ((), None)."""
        tops = [p.relative_to(self.root).parts for p in self.paths]
        if any(len(parts) < 2 for parts in tops):
            return (), None
        classes = tuple(sorted({parts[0] for parts in tops}))
        index = {c: i for i, c in enumerate(classes)}
        return classes, torch.tensor([index[parts[0]] for parts in tops], dtype=torch.long)

    @property
    def image_shape(self) -> tuple:
        return (self.channels, self.image_size, self.image_size)

    def nbytes(self) -> int:
        """Bytes of the whole set as one float32 tensor."""
        return len(self) * math.prod(self.image_shape) * 4

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            return load_image(self.paths[i], self.image_size, self.channels)
        except Exception as err:
            raise ImageFolderError(f"image {self.paths[i]} could not be decoded ({type(err).__name__}: {err}); "
                                   "delete it and resume training (--resume)") from err

    def to_tensor(self, workers: int = 0, log=print) -> torch.Tensor:
        """Decode every image into one (N, C, S, S) tensor, ``workers`` processes decoding in
        parallel. Files that fail to decode are left out (counted, like those the scan skipped)."""
        loader = torch.utils.data.DataLoader(_Tolerant(self), batch_size=256, num_workers=workers)
        images, ok = [], []
        for x, good in loader:
            images.append(x)
            ok.append(good)
        images, ok = torch.cat(images), torch.cat(ok)
        if not ok.all():
            bad = [self.paths[i] for i in (~ok).nonzero().flatten().tolist()]
            log(f"skipped {len(bad)} of {len(self)} images in {self.root} whose pixels could not be decoded "
                f"(first: {bad[0]})")
            if len(bad) == len(self):
                raise ImageFolderError(f"none of the {len(self)} images in {self.root} could be decoded "
                                       f"(first: {bad[0]})")
            self.skipped += [(p, "pixels could not be decoded") for p in bad]
            self.paths = [p for p, good in zip(self.paths, ok.tolist()) if good]
            if self.labels is not None:
                self.labels = self.labels[ok]
        return images[ok]


class _Tolerant(torch.utils.data.Dataset):
    """Item i: (image, True), or (zeros, False) when its pixels cannot be decoded."""

    def __init__(self, folder: ImageFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        try:
            return self.folder[i], True
        except ImageFolderError:
            return torch.zeros(self.folder.image_shape), False


def load_image_folder(root, image_size: int = 32, channels: int | None = None, in_memory: bool | None = None,
                      workers: int = 0, log=print):
    """The training images of a folder and their labels: ``(data, labels)``.

    ``data`` is a (N, C, S, S) tensor in [-1, 1] when the set fits in memory (``in_memory``
    None: when its float32 tensor takes at most IN_MEMORY_BYTES), else the :class:`ImageFolder`
    itself, which the trainer streams through a DataLoader with ``workers`` processes.
    ``labels``: (N,) class indices in the ImageFolder layout, else None."""
    folder = ImageFolder(root, image_size, channels, log=log)
    if in_memory is None:
        in_memory = folder.nbytes() <= IN_MEMORY_BYTES
    kind = "RGB" if folder.channels == 3 else "grey"
    if not in_memory:
        log(f"{len(folder):,} {kind} images in {folder.root} ({folder.nbytes() / 2**30:.1f} GiB as float32): "
            f"streamed from disk, {image_size}x{image_size}")
        return folder, folder.labels
    data = folder.to_tensor(workers=workers, log=log)
    log(f"read {len(data):,} {kind} images from {folder.root} into memory, {image_size}x{image_size}"
        + (f", {len(folder.classes)} classes" if folder.labels is not None else ""))
    return data, folder.labels
