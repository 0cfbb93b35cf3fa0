"""The DDPM math as small pure functions (Ho et al. 2020).

Every function takes the schedule and tensors explicitly; nothing is global.
Images are (B, C, H, W) float tensors scaled to [-1, 1]; timesteps ``t`` are
(B,) integer tensors indexing 0..T-1 (index t = paper step t+1). Each function is
the equation alone; the checks a learner needs run at its door (the end of this file).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import door
from .schedules import NoiseSchedule, extract


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
             eps: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) in closed form (Eq. 4):

        x_t = sqrt(bar-alpha_t) x_0 + sqrt(1 - bar-alpha_t) eps,   eps ~ N(0, I)

    x0, eps: (B, C, H, W); t: (B,). Returns x_t: (B, C, H, W).
    """
    return (extract(schedule.sqrt_alpha_bar, t, x0.shape) * x0
            + extract(schedule.sqrt_one_minus_alpha_bar, t, x0.shape) * eps)


def q_step(schedule: NoiseSchedule, x_prev: torch.Tensor, t: torch.Tensor,
           eps: torch.Tensor) -> torch.Tensor:
    """One forward step x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Eq. 2).

    Iterating it from x_0 must agree with :func:`q_sample` in distribution.
    """
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
    mean = (extract(schedule.posterior_mean_coef_x0, t, xt.shape) * x0
            + extract(schedule.posterior_mean_coef_xt, t, xt.shape) * xt)
    return mean, extract(schedule.beta_tilde, t, xt.shape)


def predict_x0_from_eps(schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor,
                        eps: torch.Tensor) -> torch.Tensor:
    """Invert Eq. 4 for x_0 given a noise estimate (used in Eq. 15 and the x_0 trajectory):

        hat-x_0 = (x_t - sqrt(1 - bar-alpha_t) eps) / sqrt(bar-alpha_t)
    """
    return ((xt - extract(schedule.sqrt_one_minus_alpha_bar, t, xt.shape) * eps)
            / extract(schedule.sqrt_alpha_bar, t, xt.shape))


def predict_eps_from_x0(schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor,
                        x0: torch.Tensor) -> torch.Tensor:
    """Invert Eq. 4 for the noise given an estimate of x_0 (the noise that x_0 implies):

        hat-eps = (x_t - sqrt(bar-alpha_t) hat-x_0) / sqrt(1 - bar-alpha_t)

    After hat-x_0 is clipped to [-1, 1], the noise re-derived from it agrees with the clipped
    image again (the released code of Dhariwal & Nichol 2021 does this in its DDIM step).
    """
    return ((xt - extract(schedule.sqrt_alpha_bar, t, xt.shape) * x0)
            / extract(schedule.sqrt_one_minus_alpha_bar, t, xt.shape))


def v_target(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The velocity a v-prediction network learns (Salimans & Ho 2022, Appendix D):

        v = sqrt(bar-alpha_t) eps - sqrt(1 - bar-alpha_t) x_0

    Where the SNR is low, v is mostly -x_0 and the network predicts the image, not the noise:
    x_0 needs no division by sqrt(bar-alpha_t) (see :func:`eps_and_x0`).
    """
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
    a = extract(schedule.sqrt_alpha_bar, t, xt.shape)
    sigma = extract(schedule.sqrt_one_minus_alpha_bar, t, xt.shape)
    return sigma * xt + a * output, a * xt - sigma * output


def eps_posterior_mean(schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor,
                       eps: torch.Tensor) -> torch.Tensor:
    """The reverse-process mean written with the noise (Eq. 11):

        mu_theta(x_t, t) = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - bar-alpha_t) eps_theta)

    With the true noise it equals tilde-mu_t of Eq. 7 with the true x_0.
    """
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
    if t is None:   # Algorithm 1, line 3
        t = torch.randint(0, schedule.T, (len(x0),), device=x0.device, generator=generator)
    if eps is None:  # Algorithm 1, line 4
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    xt = q_sample(schedule, x0, t, eps)
    output = model(xt, t) if y is None else model(xt, t, y)
    target = eps if schedule.prediction == "eps" else v_target(schedule, x0, t, eps)
    per_sample = F.mse_loss(output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return per_sample.mean() if reduction == "mean" else per_sample


def p_sample(schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor, output: torch.Tensor,
             z: torch.Tensor | None = None, clip_x0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step x_{t-1} ~ p_theta(x_{t-1} | x_t), Algorithm 2 line 4:

        x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - bar-alpha_t) eps_theta) + sigma_t z

    with sigma_t^2 = beta_t (the paper's choice) and z = 0 at the last step (index t = 0).
    ``output`` is the network's output: eps_theta(x_t, t), or v_theta for a v-prediction
    schedule (``schedule.prediction == "v"``), read by :func:`eps_and_x0`; then the mean is
    tilde-mu_t(x_t, hat-x_0) of Eq. 7, the same mean written without the division.
    ``clip_x0=True`` is an explicit deviation (the paper's released code does it):
    hat-x_0 is clipped to [-1, 1] and the mean becomes tilde-mu_t(x_t, hat-x_0) of Eq. 7.

    xt, output, z: (B, C, H, W); t: (B,). Returns (x_{t-1}, hat-x_0), both (B, C, H, W).
    """
    eps_theta, x0_hat = eps_and_x0(schedule, xt, t, output)
    if clip_x0:
        x0_hat = x0_hat.clamp(-1, 1)
    if clip_x0 or schedule.prediction == "v":
        mean, _ = q_posterior(schedule, x0_hat, xt, t)            # Eq. 7 with hat-x_0
    else:
        mean = eps_posterior_mean(schedule, xt, t, eps_theta)     # Eq. 11
    if z is None:
        z = torch.randn_like(xt)
    sigma = extract(schedule.beta, t, xt.shape).sqrt()
    nonzero = (t > 0).to(xt.dtype).reshape(-1, *([1] * (xt.ndim - 1)))  # no noise at t = 1 (index 0)
    return mean + nonzero * sigma * z, x0_hat


# --- the doors -----------------------------------------------------------------------------------
# Called from a notebook, each function first checks its arguments (checks.door): images
# (B, C, H, W) of one shape, timesteps (B,) in [0, T), data in [-1, 1]. Called from inside the
# package (loss_simple's q_sample, the sampler's p_sample) it trusts them: the equations above
# check nothing.
q_sample = door(q_sample, images=("x0", "eps"), t="t", data="x0")
q_step = door(q_step, images=("x_prev", "eps"), t="t")
q_posterior = door(q_posterior, images=("xt", "x0"), t="t")
predict_x0_from_eps = door(predict_x0_from_eps, images=("xt", "eps"), t="t")
predict_eps_from_x0 = door(predict_eps_from_x0, images=("xt", "x0"), t="t")
v_target = door(v_target, images=("x0", "eps"), t="t")
eps_and_x0 = door(eps_and_x0, images=("xt", "output"), t="t")
eps_posterior_mean = door(eps_posterior_mean, images=("xt", "eps"), t="t")
loss_simple = door(loss_simple, images=("x0", "eps"), t="t", data="x0", nonempty=True,
                   choices={"reduction": ("mean", "none")})
p_sample = door(p_sample, images=("xt", "output", "z"), t="t")
