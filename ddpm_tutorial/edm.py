"""Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", EDM),
written beside the DDPM formulation of the rest of the package.

EDM describes every diffusion model by a noise level sigma instead of a timestep t. Data y is
noised as x = y + sigma n, n ~ N(0, I), and a *denoiser* D(x; sigma) estimates y. Sampling
solves the probability-flow ODE (EDM Eq. 3 with s(t) = 1, sigma(t) = t)

    dx / dsigma = (x - D(x; sigma)) / sigma

from sigma_max down to 0. DDPM is one case of it: x = x_t / sqrt(bar-alpha_t) is the DDPM
sample in EDM's coordinates, at sigma_t = sqrt((1 - bar-alpha_t) / bar-alpha_t), and the eps
network gives D(x; sigma) = x - sigma eps_theta(x / sqrt(1 + sigma^2), t) (EDM Table 1, VP column).

What this module holds (symbols of EDM Table 1, ASCII):

- :class:`EDMDenoiser`: the preconditioning c_skip, c_out, c_in, c_noise around the book's U-Net.
- :func:`edm_loss`: log-normal training noise levels (P_mean, P_std) and the weight lambda(sigma).
- :func:`sigma_grid`: the rho = 7 discretisation of [sigma_min, sigma_max] (EDM Eq. 5).
- :func:`heun_step` and :func:`edm_sample`: EDM's Algorithm 2 (Heun's 2nd-order method, with
  optional "churn" noise), one step function and one loop.
- :class:`DDPMDenoiser`: a DDPM-trained eps network used as D(x; sigma), so the shipped
  checkpoint can be sampled by the same loop.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .sampling import SampleResult
from .schedules import NoiseSchedule

SIGMA_DATA = 0.5                  # EDM's sigma_data: the data's standard deviation (Table 1)
P_MEAN, P_STD = -1.2, 1.2         # ln(sigma) ~ N(P_mean, P_std^2) in training (Table 1)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0   # the sampling range of EDM's own networks (Table 1)
RHO = 7.0                         # the grid's exponent (Eq. 5)


def _sigma_column(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a (B, 1, 1, 1) float tensor on x's device: a float, a 0-d or a (B,) tensor."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a number or a (B,) tensor with B = {x.shape[0]}, got {tuple(sigma.shape)}")
    return sigma.reshape(-1, 1, 1, 1)


def preconditioning(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """EDM Table 1 ("Network and preconditioning"), for D(x; sigma) = c_skip x + c_out F(c_in x; c_noise):

        c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
        c_out   = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
        c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
        c_noise = ln(sigma) / 4

    c_in scales the noisy input to unit variance at every sigma; c_skip and c_out make the
    network's target (y - c_skip x) / c_out unit-variance too (Appendix B.6): at small sigma
    D is mostly the input itself, at large sigma mostly the network's prediction of y.
    sigma: any shape. Returns the four coefficients, each of sigma's shape.
    """
    s2 = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / s2, sigma * sigma_data / s2.sqrt(), 1 / s2.sqrt(), sigma.log() / 4


class EDMDenoiser(nn.Module):
    """D_theta(x; sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x; c_noise(sigma))   (EDM Eq. 7)

    around the book's U-Net F_theta (unchanged; trained through this wrapper by :func:`edm_loss`).
    The U-Net's time input takes integer timesteps in [0, T), embedded by sinusoids built for
    that scale, so c_noise = ln(sigma) / 4 is mapped affinely onto it, the range of c_noise over
    [sigma_min, sigma_max] onto [0, T - 1], and rounded. An affine change of the time input
    changes nothing the time MLP cannot learn; the rounding moves the sigma the network is told
    by at most 0.5 % (1,000 levels over ln(80 / 0.002) = 10.6) and leaves c_skip, c_out, c_in
    exact. Noise levels outside the range are told as its end (in training, a draw in 10^5).

    x: (B, C, H, W); sigma: a number or (B,). Returns D(x; sigma): (B, C, H, W).
    """

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA,
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.net, self.sigma_data = net, sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.config = net.config

    def time_input(self, c_noise: torch.Tensor) -> torch.Tensor:
        """c_noise (B,) -> the U-Net's integer timestep (B,): [c_noise(sigma_min), c_noise(sigma_max)] -> [0, T - 1]."""
        lo, hi = math.log(self.sigma_min) / 4, math.log(self.sigma_max) / 4
        scaled = (c_noise - lo) / (hi - lo) * (self.net.T - 1)
        return scaled.round().clamp(0, self.net.T - 1).long()

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = _sigma_column(sigma, x)                                     # (B, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = preconditioning(sigma, self.sigma_data)
        F_x = self.net(c_in * x, self.time_input(c_noise.flatten()))
        return c_skip * x + c_out * F_x.float()

    def prior_std(self, sigma: float) -> float:
        """The std of the noise sampling starts from at sigma_max: sigma itself (Algorithm 2, line 1)."""
        return sigma


def edm_loss(denoiser: EDMDenoiser, x0: torch.Tensor, sigma: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
             reduction: str = "mean") -> torch.Tensor:
    """EDM's training loss (Eq. 8 with Table 1's sigma distribution and weight):

        ln(sigma) ~ N(P_mean, P_std^2),   n ~ N(0, sigma^2 I)
        L = E[ lambda(sigma) || D_theta(y + n; sigma) - y ||^2 ],
        lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out(sigma)^2

    lambda = 1 / c_out^2 makes the loss the plain squared error of F_theta against its
    unit-variance target, so every noise level starts with the same weight. The log-normal
    puts most draws at sigma from about 0.03 to 3 (median e^-1.2 = 0.30), where Karras et al.
    found the loss can still be reduced: below it the input is nearly clean, above it the
    best D is nearly the data mean.

    x0 (the clean y): (B, C, H, W); sigma (B,) and noise (B, C, H, W) ~ N(0, I) are drawn from
    ``generator`` when not given. reduction "none": the per-sample loss (B,).
    """
    B = x0.shape[0]
    if sigma is None:
        sigma = (P_MEAN + P_STD * torch.randn(B, generator=generator)).exp().to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    s = _sigma_column(sigma, x0)
    weight = (s ** 2 + denoiser.sigma_data ** 2) / (s * denoiser.sigma_data) ** 2
    per_sample = (weight * (denoiser(x0 + s * noise, sigma) - x0) ** 2).mean(dim=(1, 2, 3))
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


class DDPMDenoiser(nn.Module):
    """A DDPM eps network as an EDM denoiser (EDM section 3 and Table 1, VP column):

        sigma_t = sqrt((1 - bar-alpha_t) / bar-alpha_t),     x = x_t / sqrt(bar-alpha_t)
        D(x; sigma) = x - sigma eps_theta(x / sqrt(1 + sigma^2), t(sigma))

    x / sqrt(1 + sigma^2) = sqrt(bar-alpha_t) x is the DDPM network's own input x_t, and
    x - sigma eps_theta is hat-x_0 of Eq. 15 written in x. t(sigma) is the timestep whose
    sigma_t is nearest to sigma in ln(sigma) (exact on the DDPM timesteps' own sigmas); sigmas
    beyond the schedule's range are told as its ends. eps-prediction networks only.

    x: (B, C, H, W); sigma: a number or (B,). Returns D(x; sigma): (B, C, H, W).
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule):
        super().__init__()
        if schedule.prediction != "eps":
            raise ValueError(f"DDPMDenoiser reads an eps-prediction network, this schedule predicts "
                             f"{schedule.prediction!r}")
        self.net, self.config = net, net.config
        alpha_bar = schedule.alpha_bar.double().cpu()
        self.register_buffer("sigmas", ((1 - alpha_bar) / alpha_bar).sqrt(), persistent=False)   # (T,) float64
        self.sigma_min, self.sigma_max = self.sigmas[0].item(), self.sigmas[-1].item()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """(B,) sigmas -> (B,) integer timesteps t(sigma), nearest in ln(sigma) (sigma_t increases with t)."""
        log_s, log_grid = sigma.double().log(), self.sigmas.to(sigma.device).log()
        right = torch.searchsorted(log_grid, log_s).clamp(1, len(log_grid) - 1)
        left = right - 1
        return torch.where(log_s - log_grid[left] <= log_grid[right] - log_s, left, right)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = _sigma_column(sigma, x)                                     # (B, 1, 1, 1)
        eps = self.net(x / (1 + sigma ** 2).sqrt(), self.timestep(sigma.flatten()))
        return x - sigma * eps.float()

    def prior_std(self, sigma: float) -> float:
        """DDPM's x_T ~ N(0, I) in EDM's coordinates: x_T / sqrt(bar-alpha_T), std sqrt(1 + sigma_max^2),
        so a DDPM sampler and this one start from the very same x_T."""
        return math.sqrt(1 + sigma ** 2)


def sigma_grid(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
               rho: float = RHO) -> torch.Tensor:
    """EDM Eq. 5, the noise levels of ``steps`` steps, then 0 (a (steps + 1,) float64 tensor):

        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i < N;  sigma_N = 0

    rho = 1 spaces the levels evenly; larger rho crowds them at small sigma, where Karras et al.
    found the ODE's curvature (the truncation error of a step) concentrated: rho = 7 is theirs.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(steps, dtype=torch.float64) / max(1, steps - 1)
    sigmas = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def heun_step(denoiser, x: torch.Tensor, sigma: float, sigma_next: float, gamma: float = 0.0,
              S_noise: float = 1.0, z: torch.Tensor | None = None, order: int = 2) -> torch.Tensor:
    """One step of EDM's Algorithm 2 from noise level sigma to sigma_next < sigma:

        sigma_hat = (1 + gamma) sigma,  x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise z     (lines 4-6: churn)
        d         = (x_hat - D(x_hat; sigma_hat)) / sigma_hat                                 (line 7)
        x_next    = x_hat + (sigma_next - sigma_hat) d                                        (line 8: Euler)
        if sigma_next > 0:                                                                    (lines 9-11: Heun)
            d'     = (x_next - D(x_next; sigma_next)) / sigma_next
            x_next = x_hat + (sigma_next - sigma_hat) (d + d') / 2

    d is dx/dsigma of the probability-flow ODE. The Heun correction averages the slope at both
    ends (2nd order: the error per step falls as the step's cube) for one more network call;
    the last step, to sigma = 0, stays Euler, where the slope is undefined. gamma > 0 first
    raises the noise level by adding fresh noise z (B, C, H, W), which lets each step correct
    the errors of earlier ones (a stochastic sampler); gamma = 0 is the deterministic ODE.
    order 1: Euler only. x: (B, C, H, W). Returns x at sigma_next: (B, C, H, W).
    """
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:                                                     # 1. churn: raise the noise level
        x = x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * S_noise * z
    d = (x - denoiser(x, sigma_hat)) / sigma_hat                      # 2. the ODE's slope
    x_next = x + (sigma_next - sigma_hat) * d                         # 3. Euler
    if order == 2 and sigma_next > 0:                                 # 4. Heun's correction
        d_next = (x_next - denoiser(x_next, sigma_next)) / sigma_next
        x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
    return x_next


def network_calls(steps: int, order: int = 2) -> int:
    """Network evaluations of :func:`edm_sample` with ``steps`` steps: 2 per Heun step but the last (2N - 1)."""
    return 2 * steps - 1 if order == 2 else steps


def churn_gammas(sigmas: torch.Tensor, S_churn: float = 0.0, S_tmin: float = 0.0,
                 S_tmax: float = float("inf")) -> list:
    """gamma_i of Algorithm 2: min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma_i <= S_tmax, else 0.
    The cap sqrt(2) - 1 keeps the added noise at most the noise already there (sigma_hat <= sqrt(2) sigma)."""
    N = len(sigmas) - 1
    g = min(S_churn / N, math.sqrt(2) - 1)
    return [g if S_tmin <= s <= S_tmax else 0.0 for s in sigmas[:-1].tolist()]


@torch.no_grad()
def edm_sample(denoiser, n: int = 16, steps: int = 18, sigmas: torch.Tensor | None = None, rho: float = RHO,
               S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = float("inf"), S_noise: float = 1.0,
               order: int = 2, seed: int | None = 0, generator: torch.Generator | None = None,
               x_T: torch.Tensor | None = None, device=None, progress: bool = True) -> SampleResult:
    """EDM's Algorithm 2: x_0 ~ N(0, sigma_0^2 I), then :func:`heun_step` along the noise levels.

    ``sigmas``: the levels, decreasing, ending at 0 (default :func:`sigma_grid` over the
    denoiser's [sigma_min, sigma_max] with ``steps`` and ``rho``). ``x_T`` (n, C, H, W): optional
    N(0, I) noise to start from, scaled by ``denoiser.prior_std(sigma_0)``, so that a DDPM
    sampler given the same x_T starts at the same point. S_churn = 0: deterministic
    (2 * steps - 1 network calls with order 2). Returns images (n, C, H, W) clamped to [-1, 1].
    """
    cfg = denoiser.config
    if sigmas is None:
        sigmas = sigma_grid(steps, denoiser.sigma_min, denoiser.sigma_max, rho)
    if sigmas.ndim != 1 or len(sigmas) < 2 or sigmas[-1] != 0 or (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError(f"sigmas must decrease strictly and end at 0, got {sigmas.tolist()[:4]}...")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (Euler) or 2 (Heun), got {order}")
    generator = generator or torch.Generator().manual_seed(0 if seed is None else seed)
    device = torch.device(device or next(denoiser.parameters()).device)
    shape = (n, cfg.in_channels, cfg.image_size, cfg.image_size)
    x_T = torch.randn(shape, generator=generator) if x_T is None else x_T
    if tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
    denoiser.eval()
    x = x_T.to(device) * denoiser.prior_std(sigmas[0].item())                # Algorithm 2, line 1
    gammas = churn_gammas(sigmas, S_churn, S_tmin, S_tmax)
    levels = sigmas.tolist()
    for i in tqdm(range(len(levels) - 1), desc=f"EDM sampler, {len(levels) - 1} steps", disable=not progress):
        z = torch.randn(shape, generator=generator).to(device) if gammas[i] > 0 else None
        x = heun_step(denoiser, x, levels[i], levels[i + 1], gammas[i], S_noise, z, order)
    return SampleResult(images=x.clamp(-1, 1).cpu(), raw=x.cpu())
