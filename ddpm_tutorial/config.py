"""Every setting of the book in one place: small frozen dataclasses and the ``PRESETS`` table.

One switch picks the preset (DESIGN.md section 4): ``DDPM_QUICK=1`` forces
``quick`` (CI: a chapter runs in about a minute on 2 CPU cores); otherwise
``gpu`` when CUDA is available (the Colab T4 target) and ``cpu`` when not.
``cifar`` (32x32 RGB) and ``rgb64`` (64x64 RGB) are for your own images and are only
used when named (``train --preset cifar --images DIR``); the switch never picks them.

Defaults are the paper's (Ho et al. 2020): T=1000, linear betas 1e-4..0.02,
eps prediction, sigma_t^2 = beta_t. Every deviation is a named field here.
The dataclasses are frozen: derive a variant with ``dataclasses.replace``, so a
shared preset can never be changed behind a chapter's back.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

SKIP_MODES = ("pre", "post", "none")
SCHEDULES = ("linear", "cosine")     # schedules.make_schedule builds each of these
LR_DECAYS = ("constant", "cosine")
PRECISIONS = ("fp16", "bf16", "fp32")  # TrainConfig.precision: the autocast dtype on CUDA
CPU_PRECISIONS = ("fp32", "bf16")      # TrainConfig.cpu_precision: bf16 autocast on the CPU is opt-in
LOSS_WEIGHTS = ("simple", "min_snr")   # diffusion.loss_weight builds each of these
PREDICTIONS = ("eps", "v")             # what the network predicts: diffusion.eps_and_x0 reads each


def _fail(message: str) -> None:
    raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 28              # 28 for Fashion-MNIST; 32 works too
    in_channels: int = 1              # grayscale
    base_channels: int = 32           # channels of the first level
    channel_mults: tuple = (1, 2, 2)  # one entry per resolution level (28, 14, 7)
    num_res_blocks: int = 1           # residual blocks per level, encoder and decoder
    attention: bool = False           # self-attention at the lowest resolution
    groups: int = 8                   # GroupNorm groups; every width must divide by it
    time_embed_dim: int = 0           # 0 means 4 * base_channels, as in the paper's code
    skip: str = "pre"                 # "pre" (correct), "post" (the original tutorial's bug), "none"
    dropout: float = 0.0              # the paper used 0.1 on CIFAR-10; small data needs none
    num_classes: int = 0              # > 0: a class embedding (plus a "null" class) for guidance

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        if self.skip is None:         # checkpoints of the first edition wrote None for "none"
            object.__setattr__(self, "skip", "none")
        if self.skip not in SKIP_MODES:
            _fail(f"skip must be one of {SKIP_MODES}, got {self.skip!r}")
        if not self.channel_mults or any(m <= 0 for m in self.channel_mults):
            _fail(f"channel_mults must be positive integers, got {self.channel_mults}")
        if self.image_size < 1 or self.in_channels < 1 or self.base_channels < 1 or self.groups < 1:
            _fail(f"image_size, in_channels, base_channels and groups must be >= 1, got "
                  f"{self.image_size}, {self.in_channels}, {self.base_channels}, {self.groups}")
        for w in self.widths:
            if w % self.groups:
                _fail(f"every level width must be divisible by groups={self.groups} for GroupNorm; "
                      f"widths are {self.widths} (base_channels={self.base_channels}, "
                      f"channel_mults={self.channel_mults})")
        if self.num_res_blocks < 1:
            _fail(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        min_size = 2 ** (len(self.channel_mults) - 1)
        if self.image_size < min_size:
            _fail(f"image_size={self.image_size} is too small for "
                  f"{len(self.channel_mults)} levels (needs >= {min_size})")
        if not 0.0 <= self.dropout < 1.0:
            _fail(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 0:
            _fail(f"num_classes must be >= 0 (0: unconditional), got {self.num_classes}")

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


@dataclass(frozen=True)
class DiffusionConfig:
    T: int = 1000                 # number of diffusion steps
    schedule: str = "linear"      # "linear" (paper) or "cosine" (Nichol & Dhariwal 2021)
    beta_start: float = 1e-4      # linear schedule: beta_1
    beta_end: float = 0.02        # linear schedule: beta_T
    prediction: str = "eps"       # the network's output: "eps" (paper) or "v" (Salimans & Ho 2022)
    zero_terminal_snr: bool = False   # rescale the schedule to bar-alpha_T = 0 (Lin et al. 2024); needs "v"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            _fail(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.prediction not in PREDICTIONS:
            _fail(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.zero_terminal_snr and self.prediction != "v":
            _fail("zero_terminal_snr=True needs prediction='v': at bar-alpha_T = 0 the noise is x_T "
                  "itself, so an eps-prediction says nothing about x_0 at t = T")
        if not isinstance(self.T, int) or self.T < 1:
            _fail(f"T must be an integer >= 1, got {self.T!r}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            _fail(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000             # optimiser steps
    batch_size: int = 64
    lr: float = 2e-4              # the paper's Adam learning rate
    adam_beta2: float = 0.999     # Adam's second-moment decay (the paper's, torch's default); EDM2 uses 0.99
    warmup_steps: int = 100       # linear warm-up (the paper used 5000 on CIFAR-10)
    lr_decay: str = "constant"    # "constant" (paper) or "cosine" down to 10% at the end
    ema_decay: float = 0.999      # the paper's 0.9999 suits 800k steps, not a few thousand
    grad_clip: float = 1.0        # the paper's code clips the gradient norm at 1
    subset: int = 0               # 0 = all 60k training images; >0 = the first N
    seed: int = 0                 # weight init, data order, t and eps of every step
    num_t_buckets: int = 10       # loss is also tracked per bucket of t
    p_uncond: float = 0.1         # class-conditional models: label dropped (-> null class) with this
                                  # probability, so one network also learns eps_theta(x_t, null)
    hflip: bool = False           # mirror each image left-right with probability 1/2 (the paper, CIFAR-10)
    precision: str = "fp16"       # CUDA autocast: "fp16" (+ loss scaling; a T4 has no bf16), "bf16", "fp32"
    cpu_precision: str = "fp32"   # CPU: "fp32", or "bf16" autocast: 1.75x faster where the CPU has
                                  # AVX-512-bf16 or AMX, about 9x slower where it has not (book/results.md)
    loss_weight: str = "simple"   # "simple": L_simple (the paper); "min_snr": Hang et al. 2023
    min_snr_gamma: float = 5.0    # min_snr: the SNR at which the weight is capped
    ema_power: float = 0.0        # 0: EMA with a fixed ema_decay; > 0: the power-function EMA of
                                  # Karras et al. 2024 with this exponent gamma (ema_decay unused)

    def __post_init__(self):
        if self.lr_decay not in LR_DECAYS:
            _fail(f"lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            _fail(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.steps < 1:
            _fail(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            _fail(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.lr < float("inf"):
            _fail(f"lr must be a finite number > 0, got {self.lr}")
        if not 0.0 < self.adam_beta2 < 1.0:
            _fail(f"adam_beta2 must be in (0, 1), got {self.adam_beta2}")
        if self.warmup_steps < 0:
            _fail(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.grad_clip > 0:
            _fail(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.subset < 0:
            _fail(f"subset must be >= 0 (0 = all images), got {self.subset}")
        if self.num_t_buckets < 1:
            _fail(f"num_t_buckets must be >= 1, got {self.num_t_buckets}")
        if not 0.0 <= self.p_uncond < 1.0:
            _fail(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        if self.precision not in PRECISIONS:
            _fail(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.cpu_precision not in CPU_PRECISIONS:
            _fail(f"cpu_precision must be one of {CPU_PRECISIONS}, got {self.cpu_precision!r}")
        if self.loss_weight not in LOSS_WEIGHTS:
            _fail(f"loss_weight must be one of {LOSS_WEIGHTS}, got {self.loss_weight!r}")
        if not 0 < self.min_snr_gamma < float("inf"):
            _fail(f"min_snr_gamma must be a finite number > 0, got {self.min_snr_gamma}")
        if not 0.0 <= self.ema_power < float("inf"):
            _fail(f"ema_power must be a finite number >= 0 (0: fixed ema_decay), got {self.ema_power}")


@dataclass(frozen=True)
class AblationConfig:
    """Chapter 07: the skip variants trained on one recipe (``model`` is the ``pre`` variant)."""
    model: ModelConfig
    train: TrainConfig            # the seed field is replaced by each of ``seeds``
    seeds: tuple = (0, 1, 2)
    variants: tuple = ("pre", "post", "none")
    n_samples: int = 500          # samples scored per model (FD with its spread)
    ddim_steps: int = 25


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    ablation: AblationConfig
    description: str = ""
    # What the chapters compute at this budget (counts only; the math never changes):
    n_samples: int = 32           # samples shown in grids (04, 05, 06)
    n_metric: int = 500           # samples scored by the Frechet distance (04, 06)
    n_metric_slow: int = 500      # 06: samples of each extra 1000-call sampler (DDIM-1000, clipped DDPM-1000)
    n_bootstrap: int = 200        # bootstrap resamples behind every FD spread
    ddim_steps: int = 50          # the default fast sampler (04, 06)
    ddim_sweep: tuple = (10, 20, 50, 100)   # 06: steps compared against DDPM-1000
    eta_sweep: tuple = (0.0, 0.5, 1.0)      # 06: DDIM's eta
    n_chains: int = 2000          # 01: chains behind the closed-form check
    slider_frames: int = 41       # frames per timestep slider
    guidance_scales: tuple = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0)   # 08: classifier-free guidance w

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CPU_MODEL = ModelConfig(base_channels=32, channel_mults=(1, 1, 2), num_res_blocks=1)
_CPU_TRAIN = TrainConfig(steps=3800, batch_size=32, lr=1e-3, warmup_steps=200, lr_decay="cosine",
                         ema_decay=0.995)


def _rgb_preset(name: str, size: int, base: int, mults: tuple, batch_size: int, description: str) -> Preset:
    """A preset for colour images of ``size`` pixels: the paper's recipe (Adam 2e-4, warm-up 5000,
    EMA 0.9999, dropout 0.1, random flips), 200k steps, bf16 autocast on GPUs; its ablation is
    the half-width network on a 20k-step recipe."""
    train = dict(batch_size=batch_size, hflip=True, precision="bf16")
    return Preset(
        name,
        model=ModelConfig(image_size=size, in_channels=3, base_channels=base, channel_mults=mults,
                          num_res_blocks=2, attention=True, dropout=0.1),
        diffusion=DiffusionConfig(),
        train=TrainConfig(steps=200_000, lr=2e-4, warmup_steps=5000, ema_decay=0.9999, **train),
        ablation=AblationConfig(
            model=ModelConfig(image_size=size, in_channels=3, base_channels=base // 2, channel_mults=mults),
            train=TrainConfig(steps=20_000, lr=5e-4, warmup_steps=1000, lr_decay="cosine", ema_decay=0.999,
                              **train),
            n_samples=500, ddim_steps=50),
        description=description, n_metric=1000, ddim_steps=100)


PRESETS = {
    # CI: tiny everything; a chapter must run in about a minute on 2 CPU cores.
    "quick": Preset(
        "quick",
        model=ModelConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=1),
        diffusion=DiffusionConfig(),
        train=TrainConfig(steps=30, batch_size=32, subset=512, warmup_steps=5, ema_decay=0.9),
        ablation=AblationConfig(
            model=ModelConfig(base_channels=16, channel_mults=(1, 2)),
            train=TrainConfig(steps=20, batch_size=16, lr=1e-3, warmup_steps=5, lr_decay="cosine",
                              ema_decay=0.9, subset=512),
            seeds=(0, 1), n_samples=32, ddim_steps=5),
        description="CI smoke run: outputs are meaningless, only that every cell runs",
        n_samples=8, n_metric=32, n_metric_slow=8, n_bootstrap=20, ddim_steps=10, ddim_sweep=(5, 10),
        eta_sweep=(0.0, 1.0), n_chains=256, slider_frames=11, guidance_scales=(0.0, 2.0)),
    # A CPU: chapter 4's training measured at 14.6 minutes on 2 idle cores. Tuned at that budget with
    # bench/quality.py (book/results.md): 32 channels at 14x14 instead of 64 cost nothing in
    # quality and buy 1.4x more steps.
    "cpu": Preset(
        "cpu", model=_CPU_MODEL, diffusion=DiffusionConfig(), train=_CPU_TRAIN,
        # The ablation trains three variants on chapter 04's recipe (steps, batch, learning rate,
        # EMA) with a half-width network: about 7 minutes per run on one idle core, 3 seeds.
        ablation=AblationConfig(model=ModelConfig(base_channels=16, channel_mults=(1, 2, 2)),
                                train=_CPU_TRAIN, seeds=(0, 1, 2), n_samples=500, ddim_steps=25),
        description="3,800 steps of batch 32 on the CPU; measured: 14.6 min on 2 idle cores, 20.7 min on 1 "
                    "shared core (2-core AMD EPYC VMs)"),
    # A Colab T4: 6-10 minutes of training by an estimate from the FLOPs (never measured: book/results.md).
    "gpu": Preset(
        "gpu",
        model=ModelConfig(base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2, attention=True),
        diffusion=DiffusionConfig(),
        train=TrainConfig(steps=6000, batch_size=128, lr=5e-4, warmup_steps=300, lr_decay="cosine",
                          ema_decay=0.999),
        ablation=AblationConfig(model=ModelConfig(base_channels=32, channel_mults=(1, 2, 2)),
                                train=TrainConfig(steps=2000, batch_size=128, lr=1e-3, warmup_steps=200,
                                                  lr_decay="cosine", ema_decay=0.995),
                                n_samples=500, ddim_steps=50),
        description="a Colab T4 GPU: 6,000 steps of batch 128, about 6-10 minutes of training (an estimate "
                    "from FLOPs, not measured)",
        n_metric=1000, n_metric_slow=1000, ddim_steps=100),
    # The next step up (book/scaling_up.md): your own colour images, one consumer GPU or many.
    # The paper's CIFAR-10 U-Net (128 channels, mults 1-2-2-2, 2 blocks, dropout 0.1, 35.7M
    # parameters, 800k steps on a TPU v3-8) at 96 channels with attention at the lowest level only:
    # 12.6M parameters, 4.7 GFLOP per 32x32 image forward (FlopCounterMode). A training step at
    # batch 128 is about 3 x 4.7 x 128 = 1.8 TFLOP, so 200k steps are about 3.4 GPU-hours at an
    # assumed 30 TFLOP/s sustained (an estimate, not a measurement: book/scaling_up.md).
    "cifar": _rgb_preset("cifar", 32, 96, (1, 2, 2, 2), batch_size=128,
                         description="32x32 RGB (CIFAR-10 sized), one consumer GPU, about 3.4 GPU-hours "
                                     "(estimated)"),
    # 64x64 RGB: 64 channels, mults 1-2-2-4 (64 -> 32 -> 16 -> 8), attention at 8x8: 9.8M parameters,
    # 9.2 GFLOP per image forward; batch 64: about 1.8 TFLOP a step, 200k steps about 3.3 GPU-hours
    # at the same assumed 30 TFLOP/s (an estimate).
    "rgb64": _rgb_preset("rgb64", 64, 64, (1, 2, 2, 4), batch_size=64,
                         description="64x64 RGB, one consumer GPU, about 3.3 GPU-hours (estimated)"),
}


def is_quick() -> bool:
    """True when ``DDPM_QUICK`` is set to a true value (1, true, yes)."""
    return os.environ.get("DDPM_QUICK", "").strip().lower() in ("1", "true", "yes")


def preset_name() -> str:
    """The one place the mode is read: quick if DDPM_QUICK=1, else by hardware."""
    if is_quick():
        return "quick"
    return "gpu" if torch.cuda.is_available() else "cpu"


def get_preset(name: str | None = None) -> Preset:
    """The named preset (``None``: the one :func:`preset_name` picks). Frozen: derive
    variants with ``dataclasses.replace(preset.train, steps=...)``."""
    name = name or preset_name()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {tuple(PRESETS)}")
    return PRESETS[name]


def default_device() -> torch.device:
    """CUDA when available, else the CPU: the one place a device is chosen by default."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device=None) -> torch.device:
    """``device`` as a ``torch.device``, or :func:`default_device` when ``None``."""
    return torch.device(device) if device is not None else default_device()
