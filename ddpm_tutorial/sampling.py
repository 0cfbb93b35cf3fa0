"""Sampling: the DDPM loop (Algorithm 2) and DDIM with fewer steps (Song et al. 2021).

Noise is drawn on the CPU from a seeded ``torch.Generator`` and then moved to the
device, so the same seed gives the same samples on any device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .diffusion import eps_and_x0, p_sample
from .schedules import NoiseSchedule


@dataclass
class SampleResult:
    """images: (N, C, H, W) in [-1, 1] (clamped). trajectory / x0_trajectory map a recorded
    timestep index t to x_t / hat-x_0 at that step, each (N, C, H, W) on the CPU."""
    images: torch.Tensor
    raw: torch.Tensor | None = None          # the final x_0 before clamping (N, C, H, W)
    trajectory: dict = field(default_factory=dict)
    x0_trajectory: dict = field(default_factory=dict)


def check_samples(result: SampleResult) -> None:
    """Raise FloatingPointError when sampling produced NaN or inf (a diverged network or bad
    settings): such results must never be written as images. (``images`` are clamped, so
    the check looks at the unclamped final x_0 kept in ``result.raw``.)"""
    raw = result.raw if result.raw is not None else result.images
    if not torch.isfinite(raw).all():
        raise FloatingPointError("sampling produced NaN or inf values: the checkpoint's weights may be "
                                 "corrupt or diverged, or the sampler settings (eta, steps) are invalid")
    # A trained model overshoots [-1, 1] a little (a few DDIM steps: up to ~20); a diverged one by orders.
    if raw.abs().max().item() > 1e3:
        raise FloatingPointError(f"sampled values reach {raw.abs().max().item():.3g}, far outside [-1, 1]: "
                                 "the checkpoint's weights are diverged or corrupt")


def guided_eps(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
               guidance: float = 0.0) -> torch.Tensor:
    """The network's noise estimate, with classifier-free guidance (Ho & Salimans 2022, Eq. 6):

        tilde-eps = (1 + w) eps_theta(x_t, t, c) - w eps_theta(x_t, t, null)

    y None: the unconditional eps_theta(x_t, t). w = 0: the conditional prediction alone.
    For w > 0 both branches run as ONE network call on a doubled batch (2B, C, H, W).
    A v-prediction network's v_theta combines the same way (hat-eps is affine in v_theta at fixed
    x_t, with coefficients that do not depend on the class).
    """
    if y is None:
        return model(x, t).float()
    if guidance == 0:
        return model(x, t, y).float()
    null = torch.full_like(y, model.config.num_classes)
    eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
    return (1 + guidance) * eps_c - guidance * eps_u


def _labels(model, y, n: int, guidance: float, device) -> torch.Tensor | None:
    """Check the class request once, before the loop: y an int or (n,) integer tensor."""
    if not 0.0 <= guidance < float("inf"):
        raise ValueError(f"guidance scale w must be a finite number >= 0, got {guidance}")
    if y is None:
        if guidance:
            raise ValueError("guidance needs a class to guide towards (y / --class)")
        return None
    K = model.config.num_classes
    if not K:
        raise ValueError("this checkpoint has no class embedding (an unconditional model): sample it "
                         "without a class, or train one with `python -m ddpm_tutorial train --conditional`")
    y = torch.full((n,), int(y), dtype=torch.long) if isinstance(y, int) else torch.as_tensor(y).long()
    if y.shape != (n,) or int(y.min()) < 0 or int(y.max()) >= K:
        raise ValueError(f"y must be one class index in [0, {K}) or {n} of them, got {y.tolist()[:8]}")
    return y.to(device)


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
                generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
                y=None, guidance: float = 0.0) -> SampleResult:
    """Algorithm 2: x_T ~ N(0, I); for t = T..1: x_{t-1} = p_sample(x_t, eps_theta(x_t, t)).

    ``record``: timestep indices at which x_t and hat-x_0 are kept (the trajectory the
    book shows on a slider). ``x_T``: optional starting noise (N, C, H, W), to compare
    models from the same noise.
    """
    x, generator, device = _start(model, n, seed, device, generator, x_T)
    y = _labels(model, y, n, guidance, device)
    schedule = schedule.to(device)
    record = set(int(r) for r in record)
    out = SampleResult(images=x)
    for t_index in tqdm(range(schedule.T - 1, -1, -1), desc="DDPM sampling", disable=not progress):
        t = torch.full((n,), t_index, device=device, dtype=torch.long)
        eps_theta = guided_eps(model, x, t, y, guidance)         # Algorithm 2, line 4: predict
        z = _noise_like(x, generator) if t_index > 0 else torch.zeros_like(x)   # line 3
        x_prev, x0_hat = p_sample(schedule, x, t, eps_theta, z, clip_x0=clip_x0)  # line 4: step
        if t_index in record:
            out.trajectory[t_index] = x.cpu()
            out.x0_trajectory[t_index] = x0_hat.clamp(-1, 1).cpu()
        x = x_prev
    out.raw, out.images = x.cpu(), x.clamp(-1, 1).cpu()
    return out


def ddim_timesteps(T: int, steps: int, t_start: int | None = None) -> list:
    """``steps`` evenly spaced timestep indices from ``t_start`` (default T-1) down to 0:
    the sub-sequence tau of DDIM and DPM-Solver."""
    t_start = T - 1 if t_start is None else t_start
    if not 0 <= t_start < T:
        raise ValueError(f"t_start must be a timestep index in [0, {T}), got {t_start}")
    if not 1 <= steps <= t_start + 1:
        raise ValueError(f"steps must be in [1, {t_start + 1}], got {steps}")
    if steps == 1:   # linspace(0, t_start, 1) is [0]: one step must start from t_start
        return [t_start]
    return sorted({int(round(i)) for i in torch.linspace(0, t_start, steps).tolist()}, reverse=True)


def _alpha_sigma(schedule: NoiseSchedule, index: int | None):
    """(sqrt(bar-alpha), sqrt(1 - bar-alpha)) at a code index; index None is the clean x_0 (1, 0)."""
    if index is None:
        one = schedule.alpha_bar.new_tensor(1.0)
        return one, one * 0
    return schedule.sqrt_alpha_bar[index], schedule.sqrt_one_minus_alpha_bar[index]


def ddim_step(schedule: NoiseSchedule, x: torch.Tensor, eps_theta: torch.Tensor, x0_hat: torch.Tensor,
              t_index: int, s_index: int | None, eta: float, z: torch.Tensor | None) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12), from step t to the next step s < t of tau (s None: x_0):

        sigma = eta * sqrt((1 - bar-alpha_s) / (1 - bar-alpha_t)) * sqrt(1 - bar-alpha_t / bar-alpha_s)
        x_s   = sqrt(bar-alpha_s) hat-x_0 + sqrt(1 - bar-alpha_s - sigma^2) eps_theta + sigma z

    eta = 0 is deterministic given x_T; eta = 1 with every step is DDPM's posterior variance.
    """
    ab_t = schedule.alpha_bar[t_index]
    ab_s = _alpha_sigma(schedule, s_index)[0] ** 2
    sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).clamp(min=0).sqrt()
    direction = (1 - ab_s - sigma ** 2).clamp(min=0).sqrt() * eps_theta    # 3. direction to x_t
    noise = sigma * z if z is not None else 0.0
    return ab_s.sqrt() * x0_hat + direction + noise                         # 4. x_s


def lambda_step(schedule: NoiseSchedule, t_index: int, s_index: int) -> torch.Tensor:
    """h = lambda_s - lambda_t, the step in lambda = log(alpha / sigma) = log(SNR) / 2 from t to s."""
    (a_t, sig_t), (a_s, sig_s) = _alpha_sigma(schedule, t_index), _alpha_sigma(schedule, s_index)
    return torch.log(a_s / sig_s) - torch.log(a_t / sig_t)


def dpmpp_2m_step(schedule: NoiseSchedule, x: torch.Tensor, x0_hat: torch.Tensor, t_index: int,
                  s_index: int | None, previous: tuple | None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), from t to the next step s < t of tau.

    With alpha = sqrt(bar-alpha), sigma = sqrt(1 - bar-alpha), lambda = log(alpha / sigma) and
    h = lambda_s - lambda_t, the exact solution of the diffusion ODE in data-prediction form is
    approximated by holding hat-x_0 linear in lambda, using the previous step's prediction:

        D   = (1 + 1/(2r)) hat-x_0(t) - 1/(2r) hat-x_0(t_prev),   r = h_prev / h
        x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) D

    ``previous`` = (hat-x_0, h) of the previous step, None on the first step and D = hat-x_0
    (first order: exactly DDIM with eta = 0). At s = x_0 (sigma_s = 0) x_s = D.
    """
    a_t, sig_t = _alpha_sigma(schedule, t_index)
    a_s, sig_s = _alpha_sigma(schedule, s_index)
    h = None if s_index is None else lambda_step(schedule, t_index, s_index)   # None: lambda_s = +inf
    D = x0_hat
    if previous is not None and h is not None:
        prev_x0, h_prev = previous
        r = h_prev / h
        D = (1 + 1 / (2 * r)) * x0_hat - 1 / (2 * r) * prev_x0
    if h is None:
        return D
    return (sig_s / sig_t) * x - a_s * torch.expm1(-h) * D


SOLVERS = ("ddim", "dpm++2m")


@torch.no_grad()
def sample(model, schedule: NoiseSchedule, method: str = "ddim", n: int = 16, steps: int = 50,
           eta: float = 0.0, seed: int | None = 0, device=None, clip_x0: bool = False, record=(),
           progress: bool = True, generator: torch.Generator | None = None,
           x_T: torch.Tensor | None = None, t_start: int | None = None,
           y=None, guidance: float = 0.0) -> SampleResult:
    """Sample on a sub-sequence tau of ``steps`` timesteps with one of ``SOLVERS``: one loop,
    one network call per step, the update done by that method's step function.

    ``x_T`` with ``t_start``: start from a given x_t at that step instead of pure noise at T
    (e.g. a real image noised with Eq. 4: the partial-noise experiment of chapter 06).
    ``y`` (a class index or (n,) indices) and ``guidance`` w: classifier-free guidance, :func:`guided_eps`.
    """
    if method not in SOLVERS:
        raise ValueError(f"method must be one of {SOLVERS}, got {method!r}")
    if not 0.0 <= eta <= 1.0:          # also refuses NaN
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM's variance), got {eta}")
    if method != "ddim" and eta:
        raise ValueError(f"eta applies to DDIM only; {method} is a deterministic ODE solver")
    x, generator, device = _start(model, n, seed, device, generator, x_T)
    y = _labels(model, y, n, guidance, device)
    schedule = schedule.to(device)
    taus = ddim_timesteps(schedule.T, steps, t_start)
    record = set(int(r) for r in record)
    out, previous = SampleResult(images=x), None
    label = f"{'DDIM' if method == 'ddim' else 'DPM-Solver++(2M)'} {len(taus)} steps"
    for i, t_index in enumerate(tqdm(taus, desc=label, disable=not progress, mininterval=2.0)):
        s_index = taus[i + 1] if i + 1 < len(taus) else None
        t = torch.full((n,), t_index, device=device, dtype=torch.long)
        output = guided_eps(model, x, t, y, guidance)                     # 1. predict eps (or v)
        eps_theta, x0_hat = eps_and_x0(schedule, x, t, output)            # 2. hat-x_0
        if clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
        if t_index in record:
            out.trajectory[t_index] = x.cpu()
            out.x0_trajectory[t_index] = x0_hat.clamp(-1, 1).cpu()
        if method == "ddim":                                              # 3.-4. the step to s
            z = _noise_like(x, generator) if eta > 0 else None
            x = ddim_step(schedule, x, eps_theta, x0_hat, t_index, s_index, eta, z)
        else:
            x = dpmpp_2m_step(schedule, x, x0_hat, t_index, s_index, previous)
            if s_index is not None:
                previous = (x0_hat, lambda_step(schedule, t_index, s_index))
    out.raw, out.images = x.cpu(), x.clamp(-1, 1).cpu()
    return out


def ddim_sample(model, schedule: NoiseSchedule, n: int = 16, steps: int = 50, eta: float = 0.0,
                **kwargs) -> SampleResult:
    """DDIM (Song et al. 2021) with ``steps`` network calls: :func:`sample` with :func:`ddim_step`."""
    return sample(model, schedule, "ddim", n=n, steps=steps, eta=eta, **kwargs)


def dpm_solver_sample(model, schedule: NoiseSchedule, n: int = 16, steps: int = 20, **kwargs) -> SampleResult:
    """DPM-Solver++(2M) (Lu et al. 2022) with ``steps`` network calls: :func:`sample` with
    :func:`dpmpp_2m_step`."""
    return sample(model, schedule, "dpm++2m", n=n, steps=steps, **kwargs)


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation between two noise tensors of equal shape (Song et al. 2021, §5.3):

        slerp(a, b, w) = sin((1 - w) theta) / sin(theta) a + sin(w theta) / sin(theta) b,
        theta = arccos(<a, b> / (|a| |b|))

    Keeps the norm of Gaussian noise near sqrt(D), which a straight line between two draws
    would shrink (the midpoint of two independent draws has norm ~ sqrt(D / 2)).
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    cos = ((a * b).sum() / (a.norm() * b.norm())).clamp(-1.0, 1.0)   # rounding can push it past 1
    theta = torch.arccos(cos).clamp(min=1e-6)
    return (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)
