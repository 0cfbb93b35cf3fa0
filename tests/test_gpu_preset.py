"""The gpu preset (the Colab T4 target) checked on any machine: its network trains and
samples on the CPU, its memory at the preset's batch fits a T4's 15 GB (an estimate,
tests/training_memory.py), and where CUDA exists the fp16 autocast + GradScaler path runs."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from ddpm_tutorial.config import get_preset, preset_name
from ddpm_tutorial.sampling import ddim_sample
from ddpm_tutorial.schedules import NoiseSchedule
from ddpm_tutorial.train import Trainer
from ddpm_tutorial.unet import UNet
from training_memory import T4_MEMORY, saved_activation_bytes, training_memory

GPU = get_preset("gpu")


def images(n: int) -> torch.Tensor:
    """Stand-in training images (n, C, H, W) in [-1, 1]: these tests check the machinery."""
    cfg = GPU.model
    return torch.rand(n, cfg.in_channels, cfg.image_size, cfg.image_size,
                      generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_colab_with_a_gpu_selects_the_gpu_preset(monkeypatch):
    monkeypatch.delenv("DDPM_QUICK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert preset_name() == "gpu"


def test_gpu_network_trains_two_steps_and_samples_two_ddim_steps_on_cpu():
    """The preset's network and recipe (learning rate, warm-up, EMA, clipping) at a batch of
    4 instead of 128, which the CPU could run but slowly; its memory is checked below."""
    torch.manual_seed(0)
    train = dataclasses.replace(GPU.train, steps=2, batch_size=4)
    trainer = Trainer(UNet(GPU.model), images(8), train, GPU.diffusion, device="cpu")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    history = trainer.fit(progress=False)
    assert len(history.loss) == 2 and all(math.isfinite(v) for v in history.loss), history.loss
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())), "no weight moved"
    schedule = NoiseSchedule.from_config(GPU.diffusion)
    out = ddim_sample(trainer.ema.module, schedule, n=2, steps=2, progress=False)
    assert out.images.shape == (2, GPU.model.in_channels, GPU.model.image_size, GPU.model.image_size)
    assert torch.isfinite(out.images).all()


class OneConv(nn.Module):
    """eps_theta = one 3x3 convolution: what autograd saves is known by hand."""

    def __init__(self):
        super().__init__()
        self.config = dataclasses.replace(GPU.model)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)


def test_saved_activations_are_counted_exactly():
    # The conv saves its input x; the MSE saves its prediction and its target: 3 (B, 1, 28, 28)
    # float32 tensors. The weight is a parameter, counted once as weights, not here.
    for batch in (1, 5):
        assert saved_activation_bytes(OneConv(), batch) == 3 * batch * 28 * 28 * 4


def test_gpu_preset_fits_a_t4_at_its_batch_size():
    model = UNet(GPU.model)
    batch = GPU.train.batch_size
    assert batch >= 128, "the T4 check is meant for the preset's batch of 128 (or more)"
    est = training_memory(model, batch)
    print(f"gpu preset, batch {batch}, {est.parameters:,} parameters (estimate):\n{est.table()}")
    assert est.parameters == sum(p.numel() for p in model.parameters())
    # Activations grow linearly with the batch (what the extrapolation relies on).
    assert saved_activation_bytes(model, 4) == pytest.approx(4 * saved_activation_bytes(model, 1), rel=0.01)
    assert est.activations > est.weights > 0
    assert est.total <= T4_MEMORY, f"estimated {est.total / 2**30:.1f} GiB exceeds a T4's 15 GiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: fp16 autocast + GradScaler")
def test_fp16_autocast_with_grad_scaler_on_cuda():
    torch.manual_seed(0)
    train = dataclasses.replace(GPU.train, steps=2)
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(UNet(GPU.model), images(2 * train.batch_size), train, GPU.diffusion, device="cuda")
    assert trainer.scaler.is_enabled(), "training on CUDA must scale the fp16 loss"
    conv = next(m for m in trainer.model.modules() if isinstance(m, nn.Conv2d))
    dtypes = []
    handle = conv.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    try:
        history = trainer.fit(progress=False)
    finally:
        handle.remove()
    assert dtypes and all(d == torch.float16 for d in dtypes), f"convolutions ran in {set(dtypes)}, not fp16"
    assert all(math.isfinite(v) for v in history.loss) and trainer.scaler.get_scale() > 0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.model.parameters())
    peak = torch.cuda.max_memory_allocated()
    est = training_memory(UNet(GPU.model), train.batch_size, device="cpu")
    print(f"measured peak {peak / 2**20:.0f} MiB; estimate without the allowance "
          f"{(est.total - est.allowance) / 2**20:.0f} MiB")
    assert peak <= est.total
    out = ddim_sample(trainer.ema.module, NoiseSchedule.from_config(GPU.diffusion), n=2, steps=2,
                      progress=False)
    assert torch.isfinite(out.images).all()
