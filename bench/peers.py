"""Peer set-ups for the quality benchmark, as eps_theta networks our Trainer and samplers can use.

Every factory returns ``(name, model)``. Each model takes x_t (B, 1, 28, 28) and t (B,)
long in [0, 1000) and returns eps_theta (B, 1, 28, 28); each has ``model.config`` with
``in_channels``, ``image_size`` and ``num_classes`` (0: unconditional), which is all ``Trainer``
and the samplers read (``Trainer`` also saves it in a checkpoint, which the benchmark does not
do for peers).

- ``simple_unet()``: the model of the original tutorial, re-created from its description (the
  DeepFindr "Diffusion models from scratch in PyTorch" SimpleUnet, 4 widths, grayscale).
- ``hf_course_unet()``: the diffusers ``UNet2DModel`` of the Hugging Face diffusion
  course's Fashion-MNIST/MNIST units.
- ``lucidrains_unet()``: ``denoising_diffusion_pytorch.Unet(dim=32, dim_mults=(1, 2, 4))``.

    python bench/peers.py        # prints each installed peer's parameter count and checks its shapes
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_tutorial.embeddings import sinusoidal_embedding

# Nothing below downloads anything; this only makes sure an import of diffusers or
# accelerate never waits on the network of an offline machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMAGE_SIZE, CHANNELS = 28, 1


def _config() -> SimpleNamespace:
    """What the trainer and the samplers read from ``model.config``."""
    return SimpleNamespace(in_channels=CHANNELS, image_size=IMAGE_SIZE, num_classes=0)


def _check_inputs(x: torch.Tensor, t: torch.Tensor) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != (CHANNELS, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"x_t must have shape (B, {CHANNELS}, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(x.shape)}")
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")


# --------------------------------------------------------------------------- SimpleUNet

class SimpleBlock(nn.Module):
    """The original tutorial's block: conv3x3 -> ReLU -> BN, + ReLU(Linear(t_emb)), conv3x3 -> ReLU -> BN,
    then a 4x4 stride-2 conv (down: (B, c_in, H, W) -> (B, c_out, H/2, W/2)) or a 4x4 stride-2
    transposed conv (up: (B, 2 c_in, H, W) -> (B, c_out, 2H, 2W); the input is cat(x, skip))."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, up: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(2 * c_in if up else c_in, c_out, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.time_proj = nn.Linear(temb_dim, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out)
        # kernel 4, stride 2, padding 1: exactly halves (doubles) an even size
        self.resample = (nn.ConvTranspose2d if up else nn.Conv2d)(c_out, c_out, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.bn1(F.relu(self.conv1(x)))                         # ReLU before BN, as in the original
        h = h + F.relu(self.time_proj(temb))[:, :, None, None]      # (B, c_out, 1, 1)
        h = self.bn2(F.relu(self.conv2(h)))
        return self.resample(h)


class SimpleUNet(nn.Module):
    """The original tutorial's eps_theta. Widths 64-128-256-512: three down blocks 64->128->256->512
    and three up blocks 512->256->128->64, a 32-d sinusoidal time embedding followed by
    Linear+ReLU, a 3x3 stem 1->64 and a 1x1 head 64->1. No residual paths, BatchNorm, no attention.

    Skips are the *outputs* of the down blocks (after downsampling), so each up block
    concatenates features of its own input resolution before its transposed conv.
    Three stride-2 steps need a size divisible by 8: 28x28 is padded to 32x32 (2 pixels each
    side, with zeros) and the output cropped back. (B, 1, 28, 28), (B,) -> (B, 1, 28, 28).
    """

    def __init__(self, widths=(64, 128, 256, 512), temb_dim: int = 32):
        super().__init__()
        self.config = _config()
        self.temb_dim = temb_dim
        self.time_mlp = nn.Linear(temb_dim, temb_dim)
        self.conv_in = nn.Conv2d(CHANNELS, widths[0], 3, padding=1)
        self.downs = nn.ModuleList(SimpleBlock(a, b, temb_dim) for a, b in zip(widths[:-1], widths[1:]))
        rev = widths[::-1]
        self.ups = nn.ModuleList(SimpleBlock(a, b, temb_dim, up=True) for a, b in zip(rev[:-1], rev[1:]))
        self.conv_out = nn.Conv2d(widths[0], CHANNELS, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_inputs(x, t)
        temb = F.relu(self.time_mlp(sinusoidal_embedding(t, self.temb_dim)))  # (B, 32)
        h = self.conv_in(F.pad(x, (2, 2, 2, 2)))                               # (B, 64, 32, 32)
        skips = []
        for down in self.downs:                      # 32 -> 16 -> 8 -> 4
            h = down(h, temb)
            skips.append(h)                          # saved after downsampling, as in the original
        for up in self.ups:                          # 4 -> 8 -> 16 -> 32
            h = up(torch.cat([h, skips.pop()], dim=1), temb)
        return self.conv_out(h)[:, :, 2:-2, 2:-2]    # (B, 1, 28, 28)


def simple_unet():
    return "simple-unet", SimpleUNet()


# --------------------------------------------------------------------------- wrappers

class EpsWrapper(nn.Module):
    """Adapts a library network to ``forward(x_t, t) -> eps`` and adds ``.config``.

    ``pad`` pixels of zeros are added on each side before the network and cropped after,
    for networks whose downsampling needs a size divisible by more than 28 allows.
    """

    def __init__(self, net: nn.Module, output=lambda out: out, pad: int = 0):
        super().__init__()
        self.net, self.output, self.pad = net, output, pad
        self.config = _config()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_inputs(x, t)
        p = self.pad
        if p:
            x = F.pad(x, (p, p, p, p))
        out = self.output(self.net(x, t))
        return out[:, :, p:-p, p:-p] if p else out


def hf_course_unet():
    """The Hugging Face diffusion course's small UNet2DModel: 28 -> 14 -> 7, attention at 14 and 7."""
    from diffusers import UNet2DModel
    net = UNet2DModel(
        sample_size=IMAGE_SIZE, in_channels=CHANNELS, out_channels=CHANNELS,
        block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    return "hf-course", EpsWrapper(net, output=lambda out: out.sample)


def lucidrains_unet():
    """lucidrains' Unet with dim_mults=(1, 2, 4): three stages but only two downsamplings (the
    last stage keeps its size), so it needs sizes divisible by 4 and takes 28x28 as it is."""
    from denoising_diffusion_pytorch import Unet
    net = Unet(dim=32, dim_mults=(1, 2, 4), channels=CHANNELS)
    pad = 0 if IMAGE_SIZE % net.downsample_factor == 0 else 2
    return "lucidrains", EpsWrapper(net, pad=pad)


@torch.no_grad()
def refresh_batchnorm(model: nn.Module, trainer, batches: int = 20) -> bool:
    """Recompute the BatchNorm statistics of the EMA weights (SimpleUNet's; False if none):
    ``AveragedModel`` copies them from the live weights. As SWA's ``update_bn``, a cumulative
    average over ``batches`` noised batches x_t ~ q(x_t | x_0), t uniform, from a fixed generator."""
    from ddpm_tutorial.diffusion import q_sample
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                     # None: an equal-weight cumulative average
    model.train()
    g, B, T = torch.Generator().manual_seed(12345), trainer.cfg.batch_size, trainer.schedule.T
    for _ in range(batches if norms else 0):
        x0 = trainer.data[torch.randint(len(trainer.data), (B,), generator=g)]
        t, eps = torch.randint(0, T, (B,), generator=g), torch.randn(x0.shape, generator=g)
        x0, t, eps = (v.to(trainer.device) for v in (x0, t, eps))
        model(q_sample(trainer.schedule, x0, t, eps), t)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return bool(norms)


PEERS = {"simple-unet": simple_unet, "hf-course": hf_course_unet, "lucidrains": lucidrains_unet}


def main():
    from ddpm_tutorial.unet import count_parameters
    x, t = torch.randn(2, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([0, 999])
    for key, factory in PEERS.items():
        try:
            name, model = factory()
        except ImportError as err:                   # diffusers / denoising-diffusion-pytorch
            print(f"{key:12s} not installed ({err}); pip install -e '.[bench]'")
            continue
        with torch.no_grad():
            out = model(x, t)
        assert out.shape == x.shape, (name, tuple(out.shape))
        print(f"{name:12s} {count_parameters(model):>12,} parameters  output {tuple(out.shape)}")


if __name__ == "__main__":
    main()
