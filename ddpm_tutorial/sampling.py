"""Sampling: the DDPM loop (Algorithm 2) and DDIM with fewer steps (Song et al. 2021).

Noise is drawn on the CPU from a seeded ``torch.Generator`` and then moved to the
device, so the same seed gives the same samples on any device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .diffusion import p_sample, predict_x0_from_eps
from .schedules import NoiseSchedule


@dataclass
class SampleResult:
    """images: (N, C, H, W) in [-1, 1] (clamped). trajectory / x0_trajectory map a recorded
    timestep index t to x_t / hat-x_0 at that step, each (N, C, H, W) on the CPU."""
    images: torch.Tensor
    trajectory: dict = field(default_factory=dict)
    x0_trajectory: dict = field(default_factory=dict)


def _start(model, n: int, seed: int | None, device, generator, x_T):
    """Algorithm 2, line 1: x_T ~ N(0, I), seeded; or the given x_T (N, C, H, W)."""
    cfg = model.config
    if n < 1:
        raise ValueError(f"number of samples must be >= 1, got {n}")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    device = torch.device(device or next(model.parameters()).device)
    shape = (n, cfg.in_channels, cfg.image_size, cfg.image_size)
    noise = torch.randn(shape, generator=generator)   # drawn even when x_T is given: same stream after
    if x_T is not None and tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
    model.eval()
    return (noise if x_T is None else x_T).to(device), generator, device


def _noise_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator).to(x.device)


@torch.no_grad()
def ddpm_sample(model, schedule: NoiseSchedule, n: int = 16, seed: int | None = 0, device=None,
                clip_x0: bool = False, record=(), progress: bool = True,
                generator: torch.Generator | None = None, x_T: torch.Tensor | None = None) -> SampleResult:
    """Algorithm 2: x_T ~ N(0, I); for t = T..1: x_{t-1} = p_sample(x_t, eps_theta(x_t, t)).

    ``record``: timestep indices at which x_t and hat-x_0 are kept (the trajectory the
    book shows on a slider). ``x_T``: optional starting noise (N, C, H, W), to compare
    models from the same noise.
    """
    x, generator, device = _start(model, n, seed, device, generator, x_T)
    schedule = schedule.to(device)
    record = set(int(r) for r in record)
    out = SampleResult(images=x)
    for t_index in tqdm(range(schedule.T - 1, -1, -1), desc="DDPM sampling", disable=not progress):
        t = torch.full((n,), t_index, device=device, dtype=torch.long)
        eps_theta = model(x, t).float()                          # Algorithm 2, line 4: predict
        z = _noise_like(x, generator) if t_index > 0 else torch.zeros_like(x)   # line 3
        x_prev, x0_hat = p_sample(schedule, x, t, eps_theta, z, clip_x0=clip_x0)  # line 4: step
        if t_index in record:
            out.trajectory[t_index] = x.cpu()
            out.x0_trajectory[t_index] = x0_hat.clamp(-1, 1).cpu()
        x = x_prev
    out.images = x.clamp(-1, 1).cpu()
    return out


def ddim_timesteps(T: int, steps: int) -> list:
    """``steps`` evenly spaced timestep indices from T-1 down to 0 (the sub-sequence tau)."""
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be in [1, {T}], got {steps}")
    if steps == 1:   # linspace(0, T-1, 1) is [0]: one step must start from pure noise, t = T
        return [T - 1]
    return sorted({int(round(i)) for i in torch.linspace(0, T - 1, steps).tolist()}, reverse=True)


@torch.no_grad()
def ddim_sample(model, schedule: NoiseSchedule, n: int = 16, steps: int = 50, eta: float = 0.0,
                seed: int | None = 0, device=None, clip_x0: bool = False, record=(),
                progress: bool = True, generator: torch.Generator | None = None,
                x_T: torch.Tensor | None = None) -> SampleResult:
    """DDIM (Song et al. 2021, Eq. 12) on a sub-sequence tau of ``steps`` timesteps:

        hat-x_0  = (x_t - sqrt(1 - bar-alpha_t) eps_theta) / sqrt(bar-alpha_t)
        sigma    = eta * sqrt((1 - bar-alpha_s) / (1 - bar-alpha_t)) * sqrt(1 - bar-alpha_t / bar-alpha_s)
        x_s      = sqrt(bar-alpha_s) hat-x_0 + sqrt(1 - bar-alpha_s - sigma^2) eps_theta + sigma z

    where s is the next (smaller) step of tau and bar-alpha_s = 1 after the last one.
    eta = 0 is deterministic given x_T; eta = 1 with every step matches DDPM's posterior variance.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    x, generator, device = _start(model, n, seed, device, generator, x_T)
    schedule = schedule.to(device)
    taus = ddim_timesteps(schedule.T, steps)
    record = set(int(r) for r in record)
    out = SampleResult(images=x)
    for i, t_index in enumerate(tqdm(taus, desc=f"DDIM {len(taus)} steps", disable=not progress)):
        t = torch.full((n,), t_index, device=device, dtype=torch.long)
        eps_theta = model(x, t).float()                                   # 1. predict eps
        x0_hat = predict_x0_from_eps(schedule, x, t, eps_theta)           # 2. hat-x_0
        if clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
        ab_t = schedule.alpha_bar[t_index]
        ab_s = schedule.alpha_bar[taus[i + 1]] if i + 1 < len(taus) else ab_t.new_tensor(1.0)
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).clamp(min=0).sqrt()
        direction = (1 - ab_s - sigma ** 2).clamp(min=0).sqrt() * eps_theta  # 3. direction to x_t
        noise = sigma * _noise_like(x, generator) if eta > 0 else 0.0
        if t_index in record:
            out.trajectory[t_index] = x.cpu()
            out.x0_trajectory[t_index] = x0_hat.clamp(-1, 1).cpu()
        x = ab_s.sqrt() * x0_hat + direction + noise                      # 4. x_s
    out.images = x.clamp(-1, 1).cpu()
    return out
