"""Checkpoints: written atomically, read with ``weights_only=True``, checked, able to rebuild their model.

A checkpoint is a plain dict of tensors, numbers, strings and lists (nothing that
needs pickle's arbitrary-code path):

    format      "ddpm_tutorial/1"
    config      {"model": {...}, "diffusion": {...}, "train": {...}}  (dataclass fields)
    step        optimiser steps done
    model       state_dict of the network being trained
    ema         state_dict of the EMA network (what sampling uses)
    optimizer   Adam state (absent from the small shipped checkpoint)
    history     {"loss": [...], "t_bucket_sum": [...], "t_bucket_count": [...]}
    preset      name of the preset the run started from (absent from older checkpoints)
    classes     a class-conditional model's class names, index = label (absent: unconditional,
                or written before class names were kept)

Reading checks everything before a network is built (:func:`check_checkpoint`): the config's
types and ranges, the step, every weight finite and of the shape the config's network has.
A tampered or damaged file is refused in one line naming it, never in the allocator.
"""
from __future__ import annotations

import dataclasses
import math
from importlib import resources
from pathlib import Path

import torch

from .checks import load_failure
from .config import DiffusionConfig, ModelConfig, TrainConfig
from .outputs import torch_save
from .schedules import NoiseSchedule
from .unet import UNet

FORMAT = "ddpm_tutorial/1"
REQUIRED_KEYS = ("format", "config", "step", "ema")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe, or does not match the model."""


def shipped_checkpoint_path(name: str = "ddpm_fashion_cpu.pt") -> Path:
    """Path of a checkpoint shipped inside the package (trained by chapter 04's full run)."""
    return Path(str(resources.files("ddpm_tutorial") / "assets" / name))


def save_checkpoint(path, state: dict, left: str | None = None) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`outputs.write_file`): a temporary file in
    the same folder, flushed to disk, then ``os.replace``. An interrupted save leaves the old
    file (or none), never half a file; the temporary file of a save that was killed outright is
    removed by the next save. A full disk is one line (``left``: what it says is left)."""
    return torch_save({"format": FORMAT, **state}, path, left=left)


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
        raise CheckpointError(f"{path} is not a readable ddpm_tutorial checkpoint ({load_failure(err)})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a ddpm_tutorial checkpoint (format {found!r}, "
                              f"expected {FORMAT!r})")
    return ckpt


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a training checkpoint safely (:func:`load_checkpoint_dict`) and check it
    (:func:`check_checkpoint`) before anything is built from it."""
    ckpt = load_checkpoint_dict(path, map_location)
    check_checkpoint(ckpt, path)
    return ckpt


# Largest step count a checkpoint may claim: far beyond any run of this book (the paper's
# CIFAR-10 model trained 800k steps), small enough that a corrupt number is caught.
MAX_STEP = 10 ** 9           # (the message below writes it 1e9)


def check_checkpoint(ckpt: dict, path="checkpoint") -> None:
    """Raise CheckpointError, naming ``path``, unless ``ckpt`` holds every key of a checkpoint,
    a config that fits this version's dataclasses (types and ranges), an integer step in
    [0, MAX_STEP], class names matching the class embedding, and finite weights of exactly the
    shapes the config's network has. The network is built on PyTorch's "meta" device for the
    comparison, which allocates nothing: a config that asks for a huge network is refused here."""
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks the keys {REQUIRED_KEYS} of a ddpm_tutorial "
                              f"checkpoint; it has {sorted(ckpt)}")
    step = ckpt["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise CheckpointError(f"{path} is damaged: its step must be an integer in [0, 1e9], got {step!r}")
    model_cfg, diffusion_cfg, _ = configs_from_checkpoint(ckpt, path)
    preset = ckpt.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise CheckpointError(f"{path} is damaged: its preset name must be a string, got {preset!r}")
    classes = ckpt.get("classes")
    if classes is not None and (not isinstance(classes, (list, tuple)) or len(classes) != model_cfg.num_classes
                                or not all(isinstance(c, str) and c for c in classes)):
        raise CheckpointError(f"{path} is damaged: its class names must be {model_cfg.num_classes} non-empty "
                              f"strings (num_classes), got {classes!r}"[:300])
    with torch.device("meta"):             # shapes only: no memory, no initialisation
        expected = UNet(model_cfg, T=diffusion_cfg.T).state_dict()
    for key in ("ema", "model"):
        if key in ckpt:
            _check_weights(ckpt[key], expected, key, path, model_cfg)


def _check_weights(weights, expected: dict, key: str, path, model_cfg: ModelConfig) -> None:
    """The ``key`` weights: a name -> tensor dict of ``expected``'s names and shapes, all finite."""
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path} is damaged: its {key} weights are not a state_dict of tensors")
    extra, lacking = sorted(set(weights) - set(expected)), sorted(set(expected) - set(weights))
    wrong = [(k, tuple(weights[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in weights and weights[k].shape != v.shape]
    if extra or lacking or wrong:
        what = (f"{wrong[0][0]} has shape {wrong[0][1]}, the config's network {wrong[0][2]}" if wrong else
                f"missing {lacking[:3]}" if lacking else f"unexpected {extra[:3]}")
        raise CheckpointError(f"{path} is damaged or tampered with: its {key} weights do not fit the network its "
                              f"own config describes ({what}; base_channels={model_cfg.base_channels}, "
                              f"channel_mults={model_cfg.channel_mults})")
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path} holds NaN or inf weights ({key} {name}): the run diverged or the file "
                                  "is damaged; use an earlier checkpoint, or retrain with a smaller --lr")


# TrainConfig fields of the first edition that no preset turned on (bf16 autocast on the CPU,
# channels-last); old checkpoints still hold them, always False, and load without them.
RETIRED_TRAIN_FIELDS = ("bf16", "channels_last")


def configs_from_checkpoint(ckpt: dict, path="checkpoint") -> tuple[ModelConfig, DiffusionConfig, TrainConfig]:
    """The (model, diffusion, train) configs a checkpoint was trained with, each field checked
    for its type before the dataclass checks its range (a string, a bool for an int, a NaN)."""
    cfg = ckpt["config"]
    try:
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or \
                not isinstance(cfg.get("diffusion"), dict) or not isinstance(cfg.get("train", {}), dict):
            raise TypeError(f"config must hold the dicts 'model', 'diffusion' and 'train', got {cfg!r}"[:200])
        train = {k: v for k, v in cfg.get("train", {}).items() if k not in RETIRED_TRAIN_FIELDS}
        return tuple(cls(**_typed(cls, fields)) for cls, fields in
                     ((ModelConfig, cfg["model"]), (DiffusionConfig, cfg["diffusion"]), (TrainConfig, train)))
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: its config does not fit this version's dataclasses: {err}") from err


def _typed(cls, fields: dict) -> dict:
    """``fields`` after checking each known one has its default's type (int, float, bool, str,
    tuple of ints); unknown names are left for the dataclass to refuse."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, value in fields.items():
        if name not in defaults:
            continue
        default = defaults[name]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif isinstance(default, str):
            ok = isinstance(value, str) or (value is None and name == "skip")   # the first edition wrote None
        elif isinstance(default, tuple):
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value)
        else:
            ok = True
        if not ok:
            raise TypeError(f"{cls.__name__}.{name} must be {_type_name(default)}, got {value!r}"[:200])
    return fields


def _type_name(default) -> str:
    return {bool: "True or False", int: "an integer", float: "a finite number", str: "a string",
            tuple: "a list of integers"}.get(type(default), type(default).__name__)


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
    if isinstance(path_or_ckpt, dict):
        ckpt = path_or_ckpt
        check_checkpoint(ckpt)
    else:
        ckpt = load_checkpoint(path_or_ckpt or shipped_checkpoint_path())
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
