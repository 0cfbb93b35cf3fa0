"""Training and sampling speed of each preset's model on this machine. Prints a table; asserts nothing.

    python bench/speed.py                  # every preset, fp32 (and bf16 autocast on CPU)
    python bench/speed.py --presets cpu --seconds 20

Training: images/s through one full Algorithm-1 step (forward, backward, Adam, EMA), at the
preset's batch size. Sampling: images x network evaluations per second at batch 64 (no grad).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from ddpm_tutorial.config import PRESET_NAMES, get_preset, hardware_summary
from ddpm_tutorial.train import Trainer
from ddpm_tutorial.unet import UNet, count_parameters


def flops_per_image(model: UNet) -> float:
    """Forward multiply-adds x 2 of the convolutions and linear layers, counted with hooks."""
    total = 0

    def hook(m, args, out):
        nonlocal total
        if isinstance(m, torch.nn.Conv2d):
            total += 2 * out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
        elif isinstance(m, torch.nn.Linear):
            total += 2 * out.numel() * m.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    size = model.config.image_size
    with torch.no_grad():
        model(torch.randn(1, 1, size, size), torch.tensor([1]))
    for h in hooks:
        h.remove()
    return float(total)


def time_training(preset, device, seconds: float, bf16: bool) -> float:
    train = dataclasses.replace(preset.train, bf16=bf16, steps=10**9)
    data = torch.rand(2048, 1, 28, 28) * 2 - 1
    trainer = Trainer(UNet(preset.model), data, train, preset.diffusion, device)
    for _ in range(3):                     # warm-up: allocator, cuDNN autotune, first-call costs
        trainer.train_step()
    _sync(device)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        trainer.train_step()
        steps += 1
    _sync(device)
    return steps * train.batch_size / (time.perf_counter() - start)


@torch.no_grad()
def time_sampling(preset, device, seconds: float, batch: int = 64) -> float:
    model = UNet(preset.model).to(device).eval()
    x = torch.randn(batch, 1, 28, 28, device=device)
    t = torch.full((batch,), 500, device=device)
    model(x, t)
    _sync(device)
    start, evals = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        model(x, t)
        evals += 1
    _sync(device)
    return evals * batch / (time.perf_counter() - start)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESET_NAMES), choices=PRESET_NAMES)
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per measurement")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"hardware: {hardware_summary(device)}\n")
    print("| preset | params | GFLOP/img (fwd) | batch | precision | train img/s | est. train min | sample img*steps/s | 1000-step samples/min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.presets:
        preset = get_preset(name)
        model = UNet(preset.model)
        gflop = flops_per_image(model) / 1e9
        sample_rate = time_sampling(preset, device, args.seconds)
        precisions = ["fp16 autocast"] if device == "cuda" else ["fp32", "bf16 autocast"]
        for precision in precisions:
            rate = time_training(preset, device, args.seconds, bf16=precision.startswith("bf16"))
            minutes = preset.train.steps * preset.train.batch_size / rate / 60
            print(f"| {name} | {count_parameters(model):,} | {gflop:.3f} | {preset.train.batch_size} | {precision} "
                  f"| {rate:.0f} | {minutes:.1f} | {sample_rate:.0f} | {60 * sample_rate / 1000:.1f} |", flush=True)


if __name__ == "__main__":
    main()
