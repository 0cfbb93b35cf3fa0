"""Settings as small dataclasses, plus the named presets of the book.

One switch picks the preset (DESIGN.md section 4): ``DDPM_QUICK=1`` forces
``quick`` (CI: a chapter runs in about a minute on 2 CPU cores); otherwise
``gpu`` when CUDA is available (the Colab T4 target) and ``cpu`` when not.

Defaults are the paper's (Ho et al. 2020): T=1000, linear betas 1e-4..0.02,
eps prediction, sigma_t^2 = beta_t. Every deviation is a named field here.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

SKIP_MODES = ("pre", "post", None)
SCHEDULES = ("linear", "cosine")


@dataclass
class ModelConfig:
    image_size: int = 28              # 28 for Fashion-MNIST; 32 works too
    in_channels: int = 1              # grayscale
    base_channels: int = 32           # channels of the first level
    channel_mults: tuple = (1, 2, 2)  # one entry per resolution level (28, 14, 7)
    num_res_blocks: int = 1           # residual blocks per level, encoder and decoder
    attention: bool = False           # self-attention at the lowest resolution
    groups: int = 8                   # GroupNorm groups; every width must divide by it
    time_embed_dim: int = 0           # 0 means 4 * base_channels, as in the paper's code
    skip: str | None = "pre"          # "pre" (correct), "post" (the seed's bug), None
    dropout: float = 0.0              # the paper used 0.1 on CIFAR-10; small data needs none

    def __post_init__(self):
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        if self.skip not in SKIP_MODES:
            raise ValueError(f"skip must be one of {SKIP_MODES}, got {self.skip!r}")
        if not self.channel_mults or any(m <= 0 for m in self.channel_mults):
            raise ValueError(f"channel_mults must be positive integers, got {self.channel_mults}")
        for w in self.widths:
            if w % self.groups:
                raise ValueError(
                    f"every level width must be divisible by groups={self.groups} for GroupNorm; "
                    f"widths are {self.widths} (base_channels={self.base_channels}, "
                    f"channel_mults={self.channel_mults})")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        min_size = 2 ** (len(self.channel_mults) - 1)
        if self.image_size < min_size:
            raise ValueError(f"image_size={self.image_size} is too small for "
                             f"{len(self.channel_mults)} levels (needs >= {min_size})")

    @property
    def widths(self) -> tuple:
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def temb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.base_channels

    @property
    def sinusoid_dim(self) -> int:
        """Size of the fixed sinusoidal embedding fed to the time MLP (temb_dim / 4)."""
        return max(2, self.temb_dim // 4)


@dataclass
class DiffusionConfig:
    T: int = 1000                 # number of diffusion steps
    schedule: str = "linear"      # "linear" (paper) or "cosine" (Nichol & Dhariwal 2021)
    beta_start: float = 1e-4      # linear schedule: beta_1
    beta_end: float = 0.02        # linear schedule: beta_T

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.T < 1:
            raise ValueError(f"T must be >= 1, got {self.T}")


@dataclass
class TrainConfig:
    steps: int = 3000             # optimiser steps
    batch_size: int = 64
    lr: float = 2e-4              # the paper's Adam learning rate
    warmup_steps: int = 100       # linear warm-up (the paper used 5000 on CIFAR-10)
    lr_decay: str = "constant"    # "constant" (paper) or "cosine" down to 10% at the end
    ema_decay: float = 0.999      # the paper's 0.9999 suits 800k steps, not a few thousand
    grad_clip: float = 1.0        # the paper's code clips the gradient norm at 1
    subset: int = 0               # 0 = all 60k training images; >0 = the first N
    seed: int = 0
    bf16: bool = False            # bf16 autocast on CPU (fp16 + GradScaler is used on CUDA)
    channels_last: bool = False
    num_t_buckets: int = 10       # loss is also tracked per bucket of t

    def __post_init__(self):
        if self.lr_decay not in ("constant", "cosine"):
            raise ValueError(f"lr_decay must be 'constant' or 'cosine', got {self.lr_decay!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")


@dataclass
class Preset:
    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    n_samples: int = 32           # samples shown by the chapters
    n_metric: int = 500           # samples scored by the quality metric
    ddim_steps: int = 50

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _presets() -> dict:
    return {
        # CI: tiny everything; a chapter must run in about a minute on 2 CPU cores.
        "quick": Preset(
            "quick",
            model=ModelConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=1),
            train=TrainConfig(steps=30, batch_size=32, subset=512, warmup_steps=5,
                              ema_decay=0.9),
            n_samples=8, n_metric=64, ddim_steps=10),
        # A laptop CPU: about 15 minutes of training on 2 cores. Tuned at that budget with
        # bench/quality.py (book/results.md): 32 channels at 14x14 instead of 64 cost nothing in
        # quality and buy 1.4x more steps; bf16 and torch.compile do not pay on an AVX2 CPU.
        "cpu": Preset(
            "cpu",
            model=ModelConfig(base_channels=32, channel_mults=(1, 1, 2), num_res_blocks=1),
            train=TrainConfig(steps=3800, batch_size=32, lr=1e-3, warmup_steps=200,
                              lr_decay="cosine", ema_decay=0.995),
            n_samples=32, n_metric=500, ddim_steps=50),
        # A Colab T4: about 10 minutes of training.
        "gpu": Preset(
            "gpu",
            model=ModelConfig(base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2,
                              attention=True),
            train=TrainConfig(steps=6000, batch_size=128, lr=5e-4, warmup_steps=300,
                              lr_decay="cosine", ema_decay=0.999),
            n_samples=32, n_metric=1000, ddim_steps=100),
    }


PRESET_NAMES = ("quick", "cpu", "gpu")


def is_quick() -> bool:
    """True when ``DDPM_QUICK`` is set to a true value (1, true, yes)."""
    return os.environ.get("DDPM_QUICK", "").strip().lower() in ("1", "true", "yes")


def preset_name() -> str:
    """The one place the mode is read: quick if DDPM_QUICK=1, else by hardware."""
    if is_quick():
        return "quick"
    return "gpu" if torch.cuda.is_available() else "cpu"


def get_preset(name: str | None = None) -> Preset:
    """A fresh copy of a named preset (``None``: the one :func:`preset_name` picks)."""
    name = name or preset_name()
    presets = _presets()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; expected one of {PRESET_NAMES}")
    return presets[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def hardware_summary(device: torch.device | str | None = None) -> str:
    """One line naming the hardware, printed beside every result."""
    import platform
    device = torch.device(device or default_device())
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def describe_run(preset: Preset) -> str:
    """The line each chapter prints so its outputs say what produced them."""
    import datetime
    return (f"preset '{preset.name}' (DDPM_QUICK={'1' if is_quick() else '0'}) on {hardware_summary()}; "
            f"run {datetime.date.today().isoformat()}")
