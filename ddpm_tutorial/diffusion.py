"""The DDPM math as small pure functions (Ho et al. 2020).

Every function takes the schedule and tensors explicitly; nothing is global.
Images are (B, C, H, W) float tensors scaled to [-1, 1]; timesteps ``t`` are
(B,) integer tensors indexing 0..T-1 (index t = paper step t+1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .schedules import NoiseSchedule, check_timesteps, extract

RANGE_TOL = 1e-3      # images may overshoot [-1, 1] by float rounding, not more


def check_images(x: torch.Tensor, name: str = "x", *, shape: tuple | None = None,
                 in_range: bool = False, min_count: int = 0) -> None:
    """Raise a clear error unless ``x`` is a floating (B, C, H, W) tensor.

    Optional, for entry points that need more: ``shape`` = the expected (C, H, W);
    ``min_count`` = the fewest images B; ``in_range`` = every value finite and in [-1, 1]
    (up to float rounding). The one image check of the package: math, trainer and metric.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4 or (shape is not None and tuple(x.shape[1:]) != tuple(shape)):
        want = f"(B, {', '.join(map(str, shape))})" if shape is not None else "(B, C, H, W)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor scaled to [-1, 1], got {x.dtype}; "
                        "convert uint8 images with x.float() / 127.5 - 1")
    if len(x) < min_count:
        raise ValueError(f"{name}: need at least {min_count} images, got {len(x)}")
    if in_range and len(x):
        lo, hi = (v.item() for v in torch.aminmax(x.detach()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} contain NaN or inf")
        if lo < -1 - RANGE_TOL or hi > 1 + RANGE_TOL:
            raise ValueError(f"{name} must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                             "clamp them (x.clamp(-1, 1)) or rescale them to [-1, 1]")


def _check_pair(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
             eps: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) in closed form (Eq. 4):

        x_t = sqrt(bar-alpha_t) x_0 + sqrt(1 - bar-alpha_t) eps,   eps ~ N(0, I)

    x0, eps: (B, C, H, W); t: (B,). Returns x_t: (B, C, H, W).
    """
    check_images(x0, "x0")
    check_timesteps(t, schedule.T, batch=x0.shape[0])
    _check_pair(x0, eps, "x0", "eps")
    return (extract(schedule.sqrt_alpha_bar, t, x0.shape) * x0
            + extract(schedule.sqrt_one_minus_alpha_bar, t, x0.shape) * eps)


def q_step(schedule: NoiseSchedule, x_prev: torch.Tensor, t: torch.Tensor,
           eps: torch.Tensor) -> torch.Tensor:
    """One forward step x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Eq. 2).

    Iterating it from x_0 must agree with :func:`q_sample` in distribution.
    """
    check_images(x_prev, "x_prev")
    check_timesteps(t, schedule.T, batch=x_prev.shape[0])
    _check_pair(x_prev, eps, "x_prev", "eps")
    return (extract(schedule.alpha, t, x_prev.shape).sqrt() * x_prev
            + extract(schedule.beta, t, x_prev.shape).sqrt() * eps)


def q_posterior(schedule: NoiseSchedule, x0: torch.Tensor, xt: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0) = N(tilde-mu_t, tilde-beta_t I) (Eqs. 6-7):

        tilde-mu_t   = sqrt(bar-alpha_{t-1}) beta_t / (1 - bar-alpha_t) x_0
                       + sqrt(alpha_t) (1 - bar-alpha_{t-1}) / (1 - bar-alpha_t) x_t
        tilde-beta_t = (1 - bar-alpha_{t-1}) / (1 - bar-alpha_t) beta_t

    Returns (mean (B, C, H, W), variance (B, 1, 1, 1)).
    """
    check_images(xt, "xt")
    check_timesteps(t, schedule.T, batch=xt.shape[0])
    _check_pair(x0, xt, "x0", "xt")
    mean = (extract(schedule.posterior_mean_coef_x0, t, xt.shape) * x0
            + extract(schedule.posterior_mean_coef_xt, t, xt.shape) * xt)
    return mean, extract(schedule.beta_tilde, t, xt.shape)


def predict_x0_from_eps(schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor,
                        eps: torch.Tensor) -> torch.Tensor:
    """Invert Eq. 4 for x_0 given a noise estimate (used in Eq. 15 and the x_0 trajectory):

        hat-x_0 = (x_t - sqrt(1 - bar-alpha_t) eps) / sqrt(bar-alpha_t)
    """
    check_images(xt, "xt")
    check_timesteps(t, schedule.T, batch=xt.shape[0])
    _check_pair(xt, eps, "xt", "eps")
    return ((xt - extract(schedule.sqrt_one_minus_alpha_bar, t, xt.shape) * eps)
            / extract(schedule.sqrt_alpha_bar, t, xt.shape))


def v_target(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The velocity a v-prediction network learns (Salimans & Ho 2022, Appendix D):

        v = sqrt(bar-alpha_t) eps - sqrt(1 - bar-alpha_t) x_0

    Where the SNR is low, v is mostly -x_0 and the network predicts the image, not the noise:
    x_0 needs no division by sqrt(bar-alpha_t) (see :func:`eps_and_x0`).
    """
    check_images(x0, "x0")
    check_timesteps(t, schedule.T, batch=x0.shape[0])
    _check_pair(x0, eps, "x0", "eps")
    return (extract(schedule.sqrt_alpha_bar, t, x0.shape) * eps
            - extract(schedule.sqrt_one_minus_alpha_bar, t, x0.shape) * x0)


def eps_and_x0(schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor,
               output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's ``output`` read as (hat-eps, hat-x_0), whatever ``schedule.prediction`` it learnt:

        "eps":  hat-eps = output,  hat-x_0 = (x_t - sqrt(1 - bar-alpha_t) hat-eps) / sqrt(bar-alpha_t)
        "v":    hat-x_0 = sqrt(bar-alpha_t) x_t - sqrt(1 - bar-alpha_t) hat-v
                hat-eps = sqrt(1 - bar-alpha_t) x_t + sqrt(bar-alpha_t) hat-v

    (the v lines invert v_target with Eq. 4, as bar-alpha + (1 - bar-alpha) = 1). The v form
    never divides, so it stays exact at bar-alpha_T = 0 (zero terminal SNR).
    xt, output: (B, C, H, W); t: (B,). Returns (hat-eps, hat-x_0), both (B, C, H, W).
    """
    if schedule.prediction == "eps":
        return output, predict_x0_from_eps(schedule, xt, t, output)
    check_images(xt, "xt")
    check_timesteps(t, schedule.T, batch=xt.shape[0])
    _check_pair(xt, output, "xt", "v_theta")
    a = extract(schedule.sqrt_alpha_bar, t, xt.shape)
    sigma = extract(schedule.sqrt_one_minus_alpha_bar, t, xt.shape)
    return sigma * xt + a * output, a * xt - sigma * output


def eps_posterior_mean(schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor,
                       eps: torch.Tensor) -> torch.Tensor:
    """The reverse-process mean written with the noise (Eq. 11):

        mu_theta(x_t, t) = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - bar-alpha_t) eps_theta)

    With the true noise it equals tilde-mu_t of Eq. 7 with the true x_0.
    """
    check_images(xt, "xt")
    check_timesteps(t, schedule.T, batch=xt.shape[0])
    _check_pair(xt, eps, "xt", "eps")
    coef = extract(schedule.beta, t, xt.shape) / extract(schedule.sqrt_one_minus_alpha_bar, t, xt.shape)
    return (xt - coef * eps) / extract(schedule.alpha, t, xt.shape).sqrt()


def normal_kl(mean1, var1, mean2, var2) -> torch.Tensor:
    """KL( N(mean1, var1) || N(mean2, var2) ) per coordinate, in nats; the arguments broadcast:

        KL = 1/2 [ log(var2 / var1) + (var1 + (mean1 - mean2)^2) / var2 - 1 ]

    Between q(x_{t-1} | x_t, x_0) and p_theta(x_{t-1} | x_t) it is L_{t-1} of Eq. 5 (Eq. 8 up to C).
    """
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def bound_weight(schedule: NoiseSchedule, sigma2: torch.Tensor | None = None) -> torch.Tensor:
    """w_t of Eq. 12, the true bound's weight on ||eps - eps_theta||^2 at every t: (T,) float64.

        w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - bar-alpha_t))

    sigma2: the reverse-step variances sigma_t^2, (T,); default beta_t (the paper's choice), where
    w_t = beta_t / (2 alpha_t (1 - bar-alpha_t)). L_simple (Eq. 14) replaces w_t by a constant.
    """
    beta, alpha, alpha_bar = (getattr(schedule, k).double() for k in ("beta", "alpha", "alpha_bar"))
    sigma2 = beta if sigma2 is None else sigma2.double()
    return beta ** 2 / (2 * sigma2 * alpha * (1 - alpha_bar))


def loss_weight(schedule: NoiseSchedule, kind: str = "simple", gamma: float = 5.0) -> torch.Tensor:
    """The weight of each timestep's ||eps - eps_theta||^2 in the training loss: (T,) float32.

        simple:   w_t = 1                            (L_simple, Eq. 14: the paper)
        min_snr:  w_t = min(SNR_t, gamma) / SNR_t    (Min-SNR-gamma, Hang et al. 2023)

    with SNR_t = bar-alpha_t / (1 - bar-alpha_t). For eps-prediction, min_snr is the x_0-loss
    weight min(SNR_t, gamma) rewritten in eps (||x_0 - hat-x_0||^2 = ||eps - eps_theta||^2 / SNR_t):
    1 at the noisy timesteps (SNR < gamma), down-weighted where SNR is large, i.e. the nearly
    clean images whose denoising L_simple spends much of its gradient on. A v-prediction
    network's loss is ||v - v_theta||^2 = (SNR_t + 1) ||x_0 - hat-x_0||^2, so there
    min_snr is w_t = min(SNR_t, gamma) / (SNR_t + 1), finite at SNR_T = 0.
    """
    if kind == "simple":
        return torch.ones_like(schedule.alpha_bar)
    if kind == "min_snr":
        snr = schedule.snr
        return (snr.clamp(max=gamma) / (snr + 1 if schedule.prediction == "v" else snr)).float()
    raise ValueError(f"loss weight must be 'simple' or 'min_snr', got {kind!r}")


def loss_simple(model, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor | None = None,
                eps: torch.Tensor | None = None, generator: torch.Generator | None = None,
                reduction: str = "mean", y: torch.Tensor | None = None) -> torch.Tensor:
    """L_simple (Eq. 14), one step of Algorithm 1:

        L_simple = E_{t, x_0, eps} || eps - eps_theta(sqrt(bar-alpha_t) x_0 + sqrt(1 - bar-alpha_t) eps, t) ||^2

    t ~ Uniform{0..T-1} and eps ~ N(0, I) are drawn when not given. For a v-prediction
    schedule (``schedule.prediction == "v"``) the target is :func:`v_target` instead of eps.
    reduction="none" returns the per-sample loss (B,), used for the loss per t bucket.
    y: class labels (B,) for a class-conditional model (Ho & Salimans 2022), else None.
    """
    check_images(x0, "x0")
    B = x0.shape[0]
    if t is None:   # Algorithm 1, line 3
        t = torch.randint(0, schedule.T, (B,), device=x0.device, generator=generator)
    if eps is None:  # Algorithm 1, line 4
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    xt = q_sample(schedule, x0, t, eps)
    output = model(xt, t) if y is None else model(xt, t, y)
    target = eps if schedule.prediction == "eps" else v_target(schedule, x0, t, eps)
    per_sample = F.mse_loss(output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def p_sample(schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor, eps_theta: torch.Tensor,
             z: torch.Tensor | None = None, clip_x0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step x_{t-1} ~ p_theta(x_{t-1} | x_t), Algorithm 2 line 4:

        x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - bar-alpha_t) eps_theta) + sigma_t z

    with sigma_t^2 = beta_t (the paper's choice) and z = 0 at the last step (index t = 0).
    ``clip_x0=True`` is an explicit deviation (the paper's released code does it):
    hat-x_0 is clipped to [-1, 1] and the mean becomes tilde-mu_t(x_t, hat-x_0) of Eq. 7.
    A v-prediction network's output (``schedule.prediction == "v"``) is read by :func:`eps_and_x0`
    and the mean is tilde-mu_t(x_t, hat-x_0), the same mean written without the division.

    xt, eps_theta, z: (B, C, H, W); t: (B,). Returns (x_{t-1}, hat-x_0), both (B, C, H, W).
    """
    check_images(xt, "xt")
    check_timesteps(t, schedule.T, batch=xt.shape[0])
    _check_pair(xt, eps_theta, "xt", "eps_theta")
    _, x0_hat = eps_and_x0(schedule, xt, t, eps_theta)
    if clip_x0:
        x0_hat = x0_hat.clamp(-1, 1)
    if clip_x0 or schedule.prediction == "v":
        mean, _ = q_posterior(schedule, x0_hat, xt, t)            # Eq. 7 with hat-x_0
    else:
        mean = eps_posterior_mean(schedule, xt, t, eps_theta)     # Eq. 11
    if z is None:
        z = torch.randn_like(xt)
    _check_pair(xt, z, "xt", "z")
    sigma = extract(schedule.beta, t, xt.shape).sqrt()
    nonzero = (t > 0).to(xt.dtype).reshape(-1, *([1] * (xt.ndim - 1)))  # no noise at t = 1 (index 0)
    return mean + nonzero * sigma * z, x0_hat
