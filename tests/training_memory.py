"""How much accelerator memory a training run needs: an estimate made on any machine
(tests/test_gpu_preset.py checks that the gpu preset fits a Colab T4 with it).

Training with Adam keeps, for every parameter, the fp32 weight, its gradient, Adam's two
moments (exp_avg, exp_avg_sq) and the EMA copy of the weight: 5 x 4 bytes. On top come
the activations autograd saves for the backward pass, which grow linearly with the batch.
They are measured, not guessed: :func:`saved_activation_bytes` runs one forward pass and
the loss with ``torch.autograd.graph.saved_tensors_hooks`` and adds up every tensor saved
for backward (each storage once; parameters are already counted as weights). Two small
batches give the per-sample cost, so a batch of 128 is estimated without ever being run.

The measurement is in fp32, an upper bound for the fp16 autocast run on CUDA (there most
saved activations take half). What no CPU can measure, the CUDA context, cuDNN workspaces
and the caching allocator's slack, is a fixed allowance, ``CUDA_ALLOWANCE``.

    est = training_memory(UNet(get_preset("gpu").model), batch_size=128)
    print(est.table())
    est.total <= T4_MEMORY
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GiB = 2 ** 30
T4_MEMORY = 15 * GiB          # what a Colab T4 offers (nvidia-smi: 15360 MiB)
CUDA_ALLOWANCE = 2 * GiB      # context + cuDNN workspace + allocator slack: an allowance, not measured
ADAM_STATES = 2               # exp_avg and exp_avg_sq, one fp32 value each per parameter


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training run's memory, by kind (see the module docstring)."""
    batch_size: int
    parameters: int           # a count, not bytes
    weights: int
    gradients: int
    optimizer: int
    ema: int
    activations: int
    allowance: int = CUDA_ALLOWANCE

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.ema + self.activations
                + self.allowance)

    def table(self) -> str:
        rows = [("weights (fp32)", self.weights), ("gradients", self.gradients),
                (f"Adam ({ADAM_STATES} states)", self.optimizer), ("EMA copy", self.ema),
                (f"activations, batch {self.batch_size} (fp32, measured)", self.activations),
                ("CUDA context, workspace (allowance)", self.allowance), ("total", self.total)]
        return "\n".join(f"{name:<44} {size / 2**20:9.1f} MiB" for name, size in rows)


def saved_activation_bytes(model: torch.nn.Module, batch_size: int, device=None) -> int:
    """Bytes autograd saves for backward in one training step of ``model`` at ``batch_size``.

    Runs eps_theta(x_t, t) and the MSE loss of Algorithm 1 on random inputs (B, C, H, W)
    shaped by ``model.config``; parameters are left out (they are counted once, as weights).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = model.config
    device = torch.device(device or next(model.parameters()).device)
    x = torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.randint(0, getattr(model, "T", 1000), (batch_size,), device=device)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        # A view shares its base's storage: count each storage once, and never a parameter.
        if storage.data_ptr() not in param_storages and tensor.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = F.mse_loss(model(x, t), torch.randn_like(x))   # Algorithm 1, line 5
        del loss   # no backward: only what the forward pass keeps is wanted
    finally:
        model.train(was_training)
    return sum(seen.values())


def training_memory(model: torch.nn.Module, batch_size: int, device=None) -> MemoryEstimate:
    """Estimate of the memory of training ``model`` with Adam and an EMA at ``batch_size``.

    Activations are measured at batches of 1 and 2 and extrapolated linearly (every layer
    of the U-Net works per sample), so the estimate costs two tiny forward passes.
    """
    one, two = (saved_activation_bytes(model, b, device) for b in (1, 2))
    per_sample, fixed = two - one, 2 * one - two
    n = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return MemoryEstimate(batch_size=batch_size, parameters=n, weights=weight_bytes,
                          gradients=weight_bytes, optimizer=ADAM_STATES * weight_bytes,
                          ema=weight_bytes, activations=max(0, fixed) + batch_size * per_sample)
