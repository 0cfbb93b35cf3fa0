"""The variational bound of Ho et al. 2020 (Eq. 5), evaluated, in bits per dimension.

    L = L_T + sum_{t=2}^{T} L_{t-1} + L_0 >= -log p_theta(x_0)
    L_T     = KL( q(x_T | x_0) || N(0, I) )                                  (no parameters)
    L_{t-1} = KL( q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t) ),  x_t ~ q(x_t | x_0)
    L_0     = -log p_theta(x_0 | x_1), the discretized Gaussian decoder (Eq. 13)

The data are 8-bit integers 0..255 scaled to [-1, 1], so the bound is one on the negative
log-likelihood of the integers: divided by D ln 2 (D = C H W values per image) it is in bits
per dimension, and 8 bits/dim is what storing the bytes as they are costs.

Each term is an expectation over x_t ~ q(x_t | x_0). :func:`estimate_bound` draws one x_t per
(image, t) and either visits every t, or visits the first few t (where most of the bound sits)
and draws the others uniformly, scaling their mean by their number; both are unbiased for the
sum, and the spread of the per-image estimates gives the standard error.
The reverse variance sigma_t^2 is beta_t or tilde-beta_t (Ho et al. section 3.2: the upper and
lower ends for the entropy of the reverse step); one network call serves both.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .checks import check_images, check_timesteps
from .diffusion import eps_and_x0, eps_posterior_mean, normal_kl, q_posterior, q_sample
from .schedules import NoiseSchedule

VARIANCES = ("beta", "beta_tilde")   # sigma_t^2 of p_theta(x_{t-1} | x_t): Ho et al. section 3.2
BIN = 2 / 255                        # the width of one grey level in [-1, 1]
GRID_TOL = 1e-3                      # how far (in grey levels) a value may sit off the 8-bit grid


def reverse_variance(schedule: NoiseSchedule, kind: str = "beta") -> torch.Tensor:
    """sigma_t^2 of the reverse step p_theta(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I): (T,) float64.

        "beta":        sigma_t^2 = beta_t         (the paper's choice; optimal for x_0 ~ N(0, I))
        "beta_tilde":  sigma_t^2 = tilde-beta_t   (optimal for x_0 deterministically one point)

    tilde-beta_1 = 0 (bar-alpha_0 = 1), which would make the decoder a point mass, so at t = 1
    the "beta_tilde" variance is tilde-beta_2, as the paper's code does (its clipped log variance).
    """
    if kind == "beta":
        return schedule.beta.double()
    if kind == "beta_tilde":
        var = schedule.beta_tilde.double().clone()
        var[0] = var[1] if len(var) > 1 else schedule.beta[0].double()
        return var
    raise ValueError(f"the reverse variance must be one of {VARIANCES}, got {kind!r}")


def pixel_bins(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The edges of each value's bin on the 8-bit grid: (lower, upper), float64, x0's shape.

    Value k in 0..255 sits at x = k / 127.5 - 1; its bin is [x - 1/255, x + 1/255], except that
    the first bin opens to -inf and the last to +inf, so the 256 bins cover the real line.
    """
    x = x0.double()
    k = (x + 1) * 127.5
    off_grid = ((k - k.round()).abs() > GRID_TOL) | (k.round() < 0) | (k.round() > 255)
    if off_grid.any():
        raise ValueError("the decoder L_0 is a likelihood of 8-bit images: x0 must be integers 0..255 "
                         "scaled to [-1, 1] (k / 127.5 - 1), as the data loader gives them")
    k = k.round()           # the edges from the integers: neighbouring bins share an edge exactly
    lower = torch.where(k == 0, -math.inf, (k - 0.5) / 127.5 - 1)
    upper = torch.where(k == 255, math.inf, (k + 0.5) / 127.5 - 1)
    return lower, upper


def log_normal_mass(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log( Phi(hi) - Phi(lo) ) for standardised edges lo < hi (either may be infinite), float64.

    Written with log Phi so that it stays finite far in the tails, where Phi(hi) - Phi(lo)
    underflows: an interval in the upper tail is mirrored into the lower one first.
    """
    upper_tail = lo > 0
    a, b = torch.where(upper_tail, -hi, lo), torch.where(upper_tail, -lo, hi)
    log_a, log_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return log_b + torch.log(-torch.expm1(log_a - log_b))


def decoder_nll(x0: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """L_0 per value: -log p_theta(x_0 | x_1) with the discretized Gaussian decoder (Eq. 13),

        p_theta(x_0 | x_1) = prod_i  integral over bin(x_0^i) of N(x; mu_theta^i(x_1, 1), sigma_1^2) dx

    bins of width 2/255 around each grey level, the edge bins open to -inf and +inf (:func:`pixel_bins`).
    x0, mean: (B, C, H, W); var: sigma_1^2, broadcastable. Returns nats, (B, C, H, W) float64.
    """
    lower, upper = pixel_bins(x0)
    mean, std = mean.double(), var.double().sqrt()
    return -log_normal_mass((lower - mean) / std, (upper - mean) / std)


def prior_kl(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL( q(x_T | x_0) || N(0, I) ) per image, summed over its values: (B,) nats, float64.

    q(x_T | x_0) = N(sqrt(bar-alpha_T) x_0, (1 - bar-alpha_T) I) (Eq. 4 at t = T).
    """
    check_images(x0, "x0")
    alpha_bar_T = schedule.alpha_bar[-1].double()
    return normal_kl(alpha_bar_T.sqrt() * x0.double(), 1 - alpha_bar_T, 0.0, 1.0).sum(dim=(1, 2, 3))


def reverse_mean(schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor, output: torch.Tensor,
                 clip_x0: bool = False) -> torch.Tensor:
    """mu_theta(x_t, t), the mean :func:`diffusion.p_sample` steps to: Eq. 11 from hat-eps, or
    tilde-mu_t(x_t, hat-x_0) of Eq. 7 when hat-x_0 is clipped or the network predicts v."""
    eps_hat, x0_hat = eps_and_x0(schedule, xt, t, output)
    if clip_x0 or schedule.prediction == "v":
        return q_posterior(schedule, x0_hat.clamp(-1, 1) if clip_x0 else x0_hat, xt, t)[0]
    return eps_posterior_mean(schedule, xt, t, eps_hat)


@torch.no_grad()
def bound_terms(model, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                variances=VARIANCES, clip_x0: bool = False) -> dict:
    """One draw of the bound's term at code index t for each image, in nats: (B,) float64 per variance.

        index t >= 1 (paper t + 1 >= 2):  L_{t-1} = KL( q(x_{t-1} | x_t, x_0) || N(mu_theta, sigma_t^2 I) )
        index t = 0  (paper t = 1):       L_0 = -log p_theta(x_0 | x_1), the discretized decoder

    with x_t = sqrt(bar-alpha_t) x_0 + sqrt(1 - bar-alpha_t) eps (Eq. 4). Each is summed over the
    image's values. x0, eps: (B, C, H, W) with x0 on the 8-bit grid; t: (B,).
    Returns {variance kind: (B,)} for each kind in ``variances`` (:func:`reverse_variance`).
    """
    check_timesteps(t, schedule.T, batch=x0.shape[0])
    xt = q_sample(schedule, x0, t, eps)
    mean = reverse_mean(schedule, xt.double(), t, model(xt, t).double(), clip_x0)   # (B, C, H, W)
    q_mean, q_var = q_posterior(schedule, x0.double(), xt.double(), t)               # Eq. 7
    last = t == 0
    out = {}
    for kind in variances:
        var = reverse_variance(schedule, kind).to(t.device)[t].reshape(-1, 1, 1, 1)  # sigma_t^2, (B, 1, 1, 1)
        kl = normal_kl(q_mean, q_var.double(), mean, var).sum(dim=(1, 2, 3))
        if last.any():          # q_var is 0 at index 0: the KL is not defined there, the decoder is
            nll = decoder_nll(x0[last], mean[last], var[last]).sum(dim=(1, 2, 3))
            kl = kl.masked_scatter(last, nll)
        out[kind] = kl
    return out


@dataclass
class BoundEstimate:
    """The bound of one model with one reverse variance, estimated on N images.

    per_image: (N,) bits/dim, each an unbiased estimate of that image's bound L, so their mean
    estimates the data's bound and their standard error covers both the images and the draws.
    terms: (N, K) nats, the K terms of each image at code indices ``t`` (N, K), which enter its
    sum with ``weight`` (N, K) (:func:`draw_timesteps`); prior: (N,) nats, L_T. ``seconds`` and ``network_calls`` are the cost of the whole estimate
    (shared by every variance estimated in the same pass).
    """
    variance: str
    per_image: torch.Tensor
    terms: torch.Tensor
    t: torch.Tensor
    weight: torch.Tensor
    prior: torch.Tensor
    T: int
    dims: int
    seconds: float
    network_calls: int

    @property
    def bpd(self) -> float:
        return self.per_image.mean().item()

    @property
    def stderr(self) -> float:
        n = len(self.per_image)
        return self.per_image.std().item() / math.sqrt(n) if n > 1 else math.nan

    def summary(self) -> str:
        return (f"sigma_t^2 = {self.variance}: {self.bpd:.3f} ± {self.stderr:.3f} bits/dim "
                f"({len(self.per_image)} images x {self.terms.shape[1]} t, {self.network_calls} network calls, "
                f"{self.seconds:.1f} s)")


def to_bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """nats per image -> bits per dimension: divide by D ln 2."""
    return nats / (dims * math.log(2))


def draw_timesteps(n: int, T: int, t_draws: int | None, t_exact: int = 0,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The code indices each of n images is evaluated at, and the weight of each term in the sum:
    (n, K) long and (n, K) float64.

    t_draws=None: every index 0..T-1, each with weight 1 (K = T). Else the first ``t_exact``
    indices, each with weight 1, and ``t_draws`` indices drawn uniformly from the other T - t_exact,
    independently (with replacement), each with weight (T - t_exact) / t_draws: T - t_exact times
    the mean of the drawn terms is unbiased for the sum of those terms. The few smallest t hold
    most of the bound (the decoder and the first KLs), so visiting them always removes most of
    the variance of drawing t uniformly from all T.
    """
    if t_draws is None:
        return torch.arange(T).expand(n, T).clone(), torch.ones(n, T, dtype=torch.float64)
    if not isinstance(t_draws, int) or t_draws < 1:
        raise ValueError(f"t_draws must be an integer >= 1, or None for every t; got {t_draws!r}")
    if not isinstance(t_exact, int) or not 0 <= t_exact < T:
        raise ValueError(f"t_exact must be an integer in [0, T) = [0, {T}), got {t_exact!r}")
    exact = torch.arange(t_exact).expand(n, t_exact)
    drawn = torch.randint(t_exact, T, (n, t_draws), generator=generator)
    weight = torch.cat([torch.ones(n, t_exact, dtype=torch.float64),
                        torch.full((n, t_draws), (T - t_exact) / t_draws, dtype=torch.float64)], dim=1)
    return torch.cat([exact, drawn], dim=1), weight


@torch.no_grad()
def estimate_bound(model, schedule: NoiseSchedule, x0: torch.Tensor, t_draws: int | None = None,
                   t_exact: int = 0, variances=VARIANCES, batch_size: int = 256, seed: int = 0,
                   clip_x0: bool = False) -> dict:
    """The bound L (Eq. 5) on the images x0 (N, C, H, W) in bits/dim, one estimate per variance.

    Each image gets K timesteps with weights (:func:`draw_timesteps`: every t; or the first
    ``t_exact`` and ``t_draws`` drawn uniformly from the rest) and one eps per timestep; its
    estimate L_T + sum_k weight_k term(t_k) (:func:`bound_terms`) is unbiased for its bound.
    The (image, t) pairs run through the network ``batch_size`` at a time, on the model's
    device. Returns {variance kind: :class:`BoundEstimate`}.
    """
    check_images(x0, "x0", min_count=1)
    pixel_bins(x0)                                  # refuse off-grid data before any network call
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    N, T, dims = len(x0), schedule.T, x0[0].numel()
    t, weight = draw_timesteps(N, T, t_draws, t_exact, g)    # (N, K) each
    K = t.shape[1]
    eps = torch.randn((N * K, *x0.shape[1:]), generator=g)   # one eps per (image, t), drawn up front
    image = torch.arange(N).repeat_interleave(K)             # (N K,): which image each pair noises
    flat_t = t.reshape(-1)
    schedule = schedule.to(device)
    start = time.perf_counter()
    terms = {kind: torch.empty(N * K, dtype=torch.float64) for kind in variances}
    for i in range(0, N * K, batch_size):
        sl = slice(i, i + batch_size)
        out = bound_terms(model, schedule, x0[image[sl]].to(device), flat_t[sl].to(device),
                          eps[sl].to(device), variances, clip_x0)
        for kind, value in out.items():
            terms[kind][sl] = value.cpu()
    prior = prior_kl(schedule, x0.to(device)).cpu()  # (N,) nats
    seconds = time.perf_counter() - start
    result = {}
    for kind in variances:
        per_t = terms[kind].reshape(N, K)
        nats = prior + (weight * per_t).sum(dim=1)   # with every t: the plain sum
        result[kind] = BoundEstimate(kind, to_bits_per_dim(nats, dims), per_t, t, weight, prior, T, dims,
                                     seconds, N * K)
    return result


def paired_difference(a: BoundEstimate, b: BoundEstimate) -> tuple[float, float]:
    """a - b in bits/dim and its standard error, for two estimates made from the same draws
    (one :func:`estimate_bound` call): the per-image differences share their images, t and eps."""
    if a.per_image.shape != b.per_image.shape or not torch.equal(a.t, b.t):
        raise ValueError("paired_difference needs two estimates from the same images and draws")
    d = a.per_image - b.per_image
    return d.mean().item(), (d.std().item() / math.sqrt(len(d)) if len(d) > 1 else math.nan)
