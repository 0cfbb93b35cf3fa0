"""Checkpoints: written atomically, read with ``weights_only=True``, able to rebuild their model.

A checkpoint is a plain dict of tensors, numbers, strings and lists (nothing that
needs pickle's arbitrary-code path):

    format      "ddpm_tutorial/1"
    config      {"model": {...}, "diffusion": {...}, "train": {...}}  (dataclass fields)
    step        optimiser steps done
    model       state_dict of the network being trained
    ema         state_dict of the EMA network (what sampling uses)
    optimizer   Adam state (absent from the small shipped checkpoint)
    history     {"loss": [...], "t_bucket_sum": [...], "t_bucket_count": [...]}
"""
from __future__ import annotations

import glob
import os
import re
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

from .config import DiffusionConfig, ModelConfig, TrainConfig
from .schedules import NoiseSchedule
from .unet import UNet

FORMAT = "ddpm_tutorial/1"
REQUIRED_KEYS = ("format", "config", "step", "ema")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe, or does not match the model."""


def shipped_checkpoint_path(name: str = "ddpm_fashion_cpu.pt") -> Path:
    """Path of a checkpoint shipped inside the package (trained by chapter 04's full run)."""
    return Path(str(resources.files("ddpm_tutorial") / "assets" / name))


# A save in progress writes its temporary file continuously and renames it within seconds, so
# a temporary file of the same checkpoint untouched for this long was left by a killed save.
STALE_TMP_SECONDS = 60


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.*.tmp`` files that a save killed by ``kill -9`` or a power cut left beside ``path``."""
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                tmp.unlink()
        except OSError:          # gone already, or not ours to delete: leave it
            pass


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed
    to disk, then ``os.replace``. An interrupted save leaves the old file (or none), never half a
    file; the temporary file of a save that was killed outright is removed by the next save."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    state = {"format": FORMAT, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_output_path(path, overwrite: bool = False, example: str = "model.pt",
                      exists_hint: str | None = None) -> Path:
    """Check, before any long work, that a file can be written at ``path``: not a folder, no
    file in the way of its parent folders, the folder writable, and no existing file unless
    ``overwrite``. Creates the parent folders. Raises ValueError / OSError saying what to do.
    ``example`` is the file name suggested when ``path`` is a folder; ``exists_hint`` replaces
    the advice given when the file exists (default: the ``train`` command's)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file path such as {path / example}")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"cannot write {path}: {parent} is a file, not a folder")
    if path.exists() and not overwrite:
        hint = exists_hint or (f"pass --force to overwrite it, --resume {path} to continue training it, "
                               "or choose another --out")
        raise ValueError(f"{path} already exists; {hint}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe", delete=True)
        probe.close()
    except OSError as err:        # read-only folder or disk, no permission
        raise OSError(f"cannot write {path}: {err.strerror or err} (in {path.parent}); "
                      "choose a folder you can write to") from err
    return path


def export_for_sampling(src, dest) -> tuple[Path, int]:
    """Write the EMA weights, configs, step and history of checkpoint ``src`` to ``dest``
    (no optimiser state, no raw weights): what the package ships and ``model_from_checkpoint``
    needs. Returns (path, bytes)."""
    ckpt = load_checkpoint(src)
    small = {k: ckpt[k] for k in ("config", "step", "ema", "history") if k in ckpt}
    path = save_checkpoint(dest, small)
    return path, path.stat().st_size


def load_checkpoint_dict(path, map_location="cpu") -> dict:
    """Read a file written by :func:`save_checkpoint` with ``weights_only=True`` (no arbitrary
    code runs): a dict, with a clear error for a missing, corrupt or foreign file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train one with chapter 04 or "
                              "`python -m ddpm_tutorial train --out PATH`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, tampered objects
        raise CheckpointError(f"{path} is not a readable ddpm_tutorial checkpoint ({_load_failure(err)})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a ddpm_tutorial checkpoint (format {found!r}, "
                              f"expected {FORMAT!r})")
    return ckpt


def _load_failure(err: Exception) -> str:
    """torch.load's error in one line. Its own text runs over several lines and advises
    ``weights_only=False``, which would run whatever code a tampered file holds."""
    text = str(err)
    refused = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", text, re.IGNORECASE)
    if refused:
        return (f"it holds a pickled object, {refused.group(1)}, that weights_only=True refuses to load, so nothing "
                "in it ran; do not load it with weights_only=False unless you trust where it came from")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first.split(". ")[0][:160]
    return f"corrupt, truncated, or not written by torch.save: {type(err).__name__}" + (f": {first}" if first else "")


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a training checkpoint safely (:func:`load_checkpoint_dict`) and check its keys."""
    ckpt = load_checkpoint_dict(path, map_location)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} lacks the keys {REQUIRED_KEYS} of a ddpm_tutorial "
                              f"checkpoint; it has {have}")
    if ckpt["format"] != FORMAT:
        raise CheckpointError(f"{path} has format {ckpt['format']!r}, expected {FORMAT!r}")
    return ckpt


# TrainConfig fields of the first edition that no preset turned on (bf16 autocast on the CPU,
# channels-last); old checkpoints still hold them, always False, and load without them.
RETIRED_TRAIN_FIELDS = ("bf16", "channels_last")


def configs_from_checkpoint(ckpt: dict) -> tuple[ModelConfig, DiffusionConfig, TrainConfig]:
    """The (model, diffusion, train) configs a checkpoint was trained with."""
    cfg = ckpt["config"]
    try:
        train = {k: v for k, v in cfg.get("train", {}).items() if k not in RETIRED_TRAIN_FIELDS}
        return ModelConfig(**cfg["model"]), DiffusionConfig(**cfg["diffusion"]), TrainConfig(**train)
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint config does not fit this version's dataclasses: {err}") from err


def load_weights(model: torch.nn.Module, state_dict: dict, what: str = "model") -> None:
    """``model.load_state_dict`` with an error that names the config mismatch."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        first = str(err).splitlines()[:4]
        raise CheckpointError(
            f"the checkpoint's {what} weights do not fit this network: the checkpoint was "
            f"trained with a different ModelConfig than {getattr(model, 'config', '?')}. "
            "Rebuild the model from the checkpoint (model_from_checkpoint) instead. "
            + " ".join(first)) from err


def model_from_checkpoint(path_or_ckpt=None, use_ema: bool = True, device="cpu"):
    """Rebuild (model, schedule, checkpoint) from a checkpoint's own config.

    ``None`` loads the checkpoint shipped with the package. ``use_ema`` picks the EMA
    weights, which give better samples than the raw weights of the last step.
    """
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else \
        load_checkpoint(path_or_ckpt or shipped_checkpoint_path())
    model_cfg, diffusion_cfg, _ = configs_from_checkpoint(ckpt)
    model = UNet(model_cfg, T=diffusion_cfg.T)
    key = "ema" if use_ema or "model" not in ckpt else "model"
    load_weights(model, ckpt[key], key)
    return model.to(device).eval(), NoiseSchedule.from_config(diffusion_cfg), ckpt


def fits_preset(path, preset) -> bool:
    """True when ``path`` holds a resumable checkpoint (optimiser state included) trained with
    exactly ``preset``'s model, diffusion and train configs; False for a missing, unreadable or
    different one (so a chapter retrains rather than reuse a run of other settings)."""
    try:
        ckpt = load_checkpoint(path)
        configs = configs_from_checkpoint(ckpt)
    except CheckpointError:
        return False
    return "optimizer" in ckpt and configs == (preset.model, preset.diffusion, preset.train)


def reader_checkpoint_path(preset_name: str) -> Path:
    """Where chapter 04 writes the reader's own checkpoint for a preset (runs/ is ignored by git)."""
    return Path("runs") / f"04_training_{preset_name}.pt"


def chapter_model(preset_name: str, device="cpu"):
    """The model later chapters sample from: the reader's chapter-04 checkpoint for this preset
    when it exists, else the one shipped with the package. Returns (model, schedule, ckpt, source),
    ``source`` a sentence saying which one was loaded, for the chapter to print."""
    path = reader_checkpoint_path(preset_name)
    if path.is_file():
        model, schedule, ckpt = model_from_checkpoint(path, device=device)
        return model, schedule, ckpt, (f"your chapter-04 checkpoint {path} ({ckpt['step']} steps, "
                                       f"preset '{preset_name}')")
    shipped = shipped_checkpoint_path()
    model, schedule, ckpt = model_from_checkpoint(shipped, device=device)
    return model, schedule, ckpt, (f"the checkpoint shipped with the package, {shipped.name} ({ckpt['step']} "
                                   f"steps of the cpu preset); run chapter 04 to sample from your own")
