"""Noise schedules and the notation glossary.

Glossary (Ho et al. 2020; code names in ASCII, one per paper symbol)

=================  ==========================================================
code               paper
=================  ==========================================================
``T``              number of diffusion steps (1000)
``t``              timestep. The paper counts t = 1..T; code indexes 0..T-1,
                   so index ``t`` holds the paper's step t+1.
``beta``           beta_t, variance of the noise added at step t (Eq. 2)
``alpha``          alpha_t = 1 - beta_t
``alpha_bar``      bar-alpha_t = prod_{s<=t} alpha_s (Eq. 4)
``alpha_bar_prev`` bar-alpha_{t-1}, with bar-alpha_0 = 1
``x0``             x_0, a data image scaled to [-1, 1]
``xt``             x_t, the noised image at step t
``eps``            epsilon ~ N(0, I), the noise; ``eps_theta`` the network's guess
``beta_tilde``     tilde-beta_t, variance of q(x_{t-1} | x_t, x_0) (Eq. 7)
``sigma``          sigma_t, std of the reverse step; sigma_t^2 = beta_t (paper)
``snr``            signal-to-noise ratio bar-alpha_t / (1 - bar-alpha_t)
``v``              v = sqrt(bar-alpha_t) eps - sqrt(1 - bar-alpha_t) x_0, the
                   target of a v-prediction network (Salimans & Ho 2022)
=================  ==========================================================

Everything is computed in float64 (products of 1000 numbers near 1 lose
digits in float32) and stored as float32 buffers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from .checks import check_int
from .config import PREDICTIONS, SCHEDULES, DiffusionConfig


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """beta_t rising linearly from beta_1 to beta_T (the paper's schedule), float64 (T,)."""
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021), Eq. 17: bar-alpha(t) = f(t)/f(0),
    f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); beta_t = 1 - bar-alpha_t / bar-alpha_{t-1},
    clipped at ``max_beta`` to avoid the singularity at t = T. float64 (T,)."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(beta: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024), Algorithm 1: shift and scale sqrt(bar-alpha_t) so that it keeps its first
    value and ends at exactly 0, then read the betas back:

        sqrt(bar-alpha_t)' = (sqrt(bar-alpha_t) - sqrt(bar-alpha_T)) * sqrt(bar-alpha_1)
                             / (sqrt(bar-alpha_1) - sqrt(bar-alpha_T))

    so x_T is pure noise (SNR_T = 0) and training sees the noise level the sampler starts from.
    The last beta becomes 1. float64 (T,); needs T >= 2.
    """
    if beta.ndim != 1 or beta.numel() < 2:
        raise ValueError(f"zero terminal SNR needs at least 2 steps, got betas of shape {tuple(beta.shape)}")
    sqrt_ab = torch.cumprod(1 - beta.double(), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    alpha_bar = ((sqrt_ab - last) * first / (first - last)) ** 2
    alpha = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alpha


@dataclass(frozen=True)
class NoiseSchedule:
    """Every per-step coefficient the math needs, each a float32 tensor of shape (T,), and what
    the network predicts (``prediction``: "eps" or "v", read by ``diffusion.eps_and_x0``)."""
    beta: torch.Tensor
    alpha: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor
    sqrt_alpha_bar: torch.Tensor
    sqrt_one_minus_alpha_bar: torch.Tensor
    beta_tilde: torch.Tensor          # posterior variance, Eq. 7
    posterior_mean_coef_x0: torch.Tensor   # Eq. 7, coefficient of x_0
    posterior_mean_coef_xt: torch.Tensor   # Eq. 7, coefficient of x_t
    prediction: str = "eps"

    @property
    def T(self) -> int:
        return self.beta.shape[0]

    @property
    def snr(self) -> torch.Tensor:
        return self.alpha_bar / (1 - self.alpha_bar)

    @property
    def device(self) -> torch.device:
        return self.beta.device

    @classmethod
    def from_betas(cls, beta: torch.Tensor, prediction: str = "eps") -> "NoiseSchedule":
        """The coefficients of the betas (T,); the last beta may be 1 (zero terminal SNR)."""
        beta = beta.to(torch.float64)
        if (beta.ndim != 1 or beta.numel() == 0 or not ((beta[:-1] > 0) & (beta[:-1] < 1)).all()
                or not 0 < beta[-1] <= 1):
            raise ValueError("betas must be a 1-D tensor with every value in (0, 1) "
                             "(the last may be 1: zero terminal SNR)")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if beta[-1] == 1 and prediction != "v":
            raise ValueError("a schedule with bar-alpha_T = 0 (zero terminal SNR) needs prediction='v'")
        alpha = 1 - beta
        alpha_bar = torch.cumprod(alpha, dim=0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        coeffs = dict(
            beta=beta, alpha=alpha, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev,
            sqrt_alpha_bar=alpha_bar.sqrt(), sqrt_one_minus_alpha_bar=(1 - alpha_bar).sqrt(),
            beta_tilde=(1 - alpha_bar_prev) / (1 - alpha_bar) * beta,
            posterior_mean_coef_x0=alpha_bar_prev.sqrt() * beta / (1 - alpha_bar),
            posterior_mean_coef_xt=alpha.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar),
        )
        return cls(**{k: v.to(torch.float32) for k, v in coeffs.items()}, prediction=prediction)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig | None = None) -> "NoiseSchedule":
        cfg = cfg or DiffusionConfig()
        return make_schedule(cfg.schedule, cfg.T, cfg.beta_start, cfg.beta_end,
                             zero_terminal_snr=cfg.zero_terminal_snr, prediction=cfg.prediction)

    def to(self, device) -> "NoiseSchedule":
        """The same schedule with every tensor on ``device`` (``prediction`` kept)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def make_schedule(name: str = "linear", T: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, zero_terminal_snr: bool = False,
                  prediction: str = "eps") -> NoiseSchedule:
    """The schedule called ``name`` (one of ``config.SCHEDULES``) with ``T`` steps, rescaled to
    zero terminal SNR when asked (:func:`rescale_zero_terminal_snr`), for a network that
    predicts ``prediction``."""
    betas = {"linear": lambda: linear_betas(T, beta_start, beta_end),
             "cosine": lambda: cosine_betas(T)}
    if name not in betas:
        raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")
    check_int(T, "T", minimum=1)
    beta = betas[name]()
    return NoiseSchedule.from_betas(rescale_zero_terminal_snr(beta) if zero_terminal_snr else beta, prediction)


def extract(a: torch.Tensor, t: torch.Tensor, x_shape) -> torch.Tensor:
    """Pick a[t] per sample and shape it to broadcast over x: (T,), (B,) -> (B, 1, 1, 1).

    No range check here (it runs several times per sampling step): the doors validate ``t``
    once (checks.check_timesteps). Out-of-range indices still fail in the indexing.
    """
    if t.ndim != 1 or t.shape[0] != x_shape[0]:
        raise ValueError(f"t must have shape (B,) = ({x_shape[0]},), got {tuple(t.shape)}")
    out = a.to(t.device)[t.long()]                      # (B,)
    return out.reshape(t.shape[0], *([1] * (len(x_shape) - 1)))
