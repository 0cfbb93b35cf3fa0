"""Your own images: a folder of PNG / JPEG files as training data (the CLI's ``--images``).

The folder is searched recursively. torchvision's ImageFolder layout (root/<class>/<image>)
is the special case where every image lies in a first-level subfolder: the subfolder names,
sorted, are then the classes (for train --conditional). Each image is resized so its shorter
side is image_size and center-cropped to a square (PIL's ImageOps.fit, bicubic), converted to
``channels`` and scaled to [-1, 1] exactly like Fashion-MNIST (data.py). Decisions, stated in
the errors too:

- unreadable files (not an image, truncated, a mode PIL cannot convert) are SKIPPED and
  counted, the count and the first one printed; only a folder with none left is an error.
  A file whose header reads but whose pixels do not, met while streaming, stops the run
  with its name (delete it and resume): a fixed batch cannot silently lose a member.
- mixed modes: grey and colour images in one folder are REFUSED for a colour model
  (channels=3): the network would learn "grey" as a mode of the data, which is rarely
  wanted. For a grey model (channels=1) colour images are converted to luminance
  (L = 0.299 R + 0.587 G + 0.114 B), as intended. Alpha is dropped; palette images are colour.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

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


def _open_header(path: Path) -> tuple:
    """(PIL mode, (width, height)) of ``path``, reading only its header (fast); raises on a file
    PIL cannot read."""
    from PIL import Image
    with Image.open(path) as im:
        return im.mode, im.size


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
    ``colour``: whether any image is colour (a grey folder read with channels=3 is not).
    Scanning reads each file's header only; pixels are decoded in :meth:`__getitem__`.
    Images scaled up more than 2x, or grey ones made RGB, are said (``log``), not done silently."""

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
        self.paths, modes, sizes, self.skipped = [], [], [], []
        for path in candidates:
            try:
                mode, size = _open_header(path)
                if mode in ("I", "F"):
                    raise ValueError(f"32-bit {'integer' if mode == 'I' else 'float'} pixels are not supported")
            except Exception as err:                 # PIL raises many kinds: UnidentifiedImageError, OSError, ...
                self.skipped.append((path, f"{type(err).__name__}: {err}"))
                continue
            self.paths.append(path)
            modes.append(mode)
            sizes.append(size)
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
        self.colour = bool(colour)
        if self.channels == 3 and not colour:
            log(f"all {len(grey)} images in {self.root} are greyscale: each is made RGB (three equal channels) "
                "for a colour model")
        small = [(p, s) for p, s in zip(self.paths, sizes) if 2 * min(s) < image_size]
        if small:
            p, s = min(small, key=lambda item: min(item[1]))
            log(f"{len(small)} of {len(self.paths)} images are less than half of {image_size} px on their shorter "
                f"side and are scaled up (the smallest, {p}, {s[0]}x{s[1]}, {image_size / min(s):.0f}x): they will "
                "look blurred; choose a smaller --image-size, or larger images")
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
                                   "delete it or replace it with a good copy") from err

    def to_tensor(self, workers: int = 0, log=print) -> torch.Tensor:
        """Decode every image into one (N, C, S, S) tensor, ``workers`` processes decoding in
        parallel. Files that fail to decode are left out (counted, like those the scan skipped)."""
        batches = math.ceil(len(self) / 256)
        if workers > batches:               # a worker decodes whole batches: more would wait idle
            log(f"{len(self)} images make {batches} batch{'es' if batches > 1 else ''} of 256 to decode: "
                f"{batches} of the {workers} --workers are used")
            workers = batches
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
    return folder_data(ImageFolder(root, image_size, channels, log=log), in_memory, workers, log)


def folder_data(folder: ImageFolder, in_memory: bool | None = None, workers: int = 0, log=print):
    """``(data, labels)`` of a scanned :class:`ImageFolder`, as :func:`load_image_folder` returns them."""
    image_size = folder.image_size
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
