"""Sampling: one loop over the timesteps, one network call per step, and one step function per
method: DDPM (Algorithm 2, ``diffusion.p_sample``), DDIM (Song et al. 2021) and
DPM-Solver++(2M) (Lu et al. 2022).

Noise is drawn on the CPU from a seeded ``torch.Generator`` and then moved to the
device, so the same seed gives the same samples on any device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .checks import check_int, check_number, door
from .diffusion import eps_and_x0, p_sample, predict_eps_from_x0
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


def guided_output(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                  guidance: float = 0.0) -> torch.Tensor:
    """The network's output, with classifier-free guidance (Ho & Salimans 2022, Eq. 6):

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
    out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
    return (1 + guidance) * out_c - guidance * out_u


guided_eps = guided_output      # the name it had before v-prediction; chapter 08 imports it


def estimates(schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor, output: torch.Tensor,
              clip_x0: bool = False, rederive_eps: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(hat-eps, hat-x_0) of the network's output (``diffusion.eps_and_x0``). ``clip_x0``: hat-x_0
    clipped to [-1, 1]; ``rederive_eps`` (with clip_x0): hat-eps re-derived from the clipped
    hat-x_0 (``diffusion.predict_eps_from_x0``), so that DDIM's direction term agrees with it."""
    eps_hat, x0_hat = eps_and_x0(schedule, x, t, output)
    if clip_x0:
        x0_hat = x0_hat.clamp(-1, 1)
    if clip_x0 and rederive_eps:
        eps_hat = predict_eps_from_x0(schedule, x, t, x0_hat)
    return eps_hat, x0_hat


def noise_stream(generator: torch.Generator, shape: tuple, device: torch.device, count: int, chunk: int = 25):
    """``count`` draws z ~ N(0, I) of ``shape`` on ``device``, one per step. Each is drawn on the
    CPU from ``generator`` exactly as a draw at its own step would be (the same seed gives the
    same samples as ever, on any device); on a GPU ``chunk`` steps' draws travel in one pinned,
    non-blocking copy, so no step waits for a copy of its noise."""
    for start in range(0, count, chunk):
        zs = [torch.randn(shape, generator=generator) for _ in range(min(chunk, count - start))]
        if device.type == "cpu":
            yield from zs
        else:
            yield from torch.stack(zs).pin_memory().to(device, non_blocking=True)


def _start(model, n: int, seed: int | None, generator, x_T, device):
    """Algorithm 2, line 1: x_T ~ N(0, I), seeded; or the given x_T (N, C, H, W)."""
    cfg = model.config
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    # drawn even when x_T is given, so the noise of the steps after is the same stream
    noise = torch.randn((n, cfg.in_channels, cfg.image_size, cfg.image_size), generator=generator)
    model.eval()
    return (noise if x_T is None else x_T).to(device), generator


def ddim_timesteps(T: int, steps: int, t_start: int | None = None) -> list:
    """``steps`` evenly spaced timestep indices from ``t_start`` (default T-1) down to 0:
    the sub-sequence tau of DDIM and DPM-Solver."""
    t_start = _first_step(T, t_start)
    if not 1 <= steps <= t_start + 1:
        raise ValueError(f"steps must be in [1, {t_start + 1}], got {steps}")
    if steps == 1:   # linspace(0, t_start, 1) is [0]: one step must start from t_start
        return [t_start]
    return sorted({int(round(i)) for i in torch.linspace(0, t_start, steps).tolist()}, reverse=True)


def _first_step(T: int, t_start: int | None) -> int:
    t_start = T - 1 if t_start is None else t_start
    if not 0 <= t_start < T:
        raise ValueError(f"t_start must be a timestep index in [0, {T}), got {t_start}")
    return t_start


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


SOLVERS = ("ddpm", "ddim", "dpm++2m")
LABELS = {"ddpm": "DDPM", "ddim": "DDIM", "dpm++2m": "DPM-Solver++(2M)"}


def timesteps(method: str, T: int, steps: int | None = None, t_start: int | None = None) -> list:
    """The timestep indices a method visits, from t_start (default T-1) down to 0: every one for
    DDPM (each step of Algorithm 2 goes from t to t - 1), ``steps`` of them for the others
    (:func:`ddim_timesteps`; default 50)."""
    if method == "ddpm":
        return list(range(_first_step(T, t_start), -1, -1))
    return ddim_timesteps(T, 50 if steps is None else steps, t_start)


@torch.no_grad()
def sample(model, schedule: NoiseSchedule, method: str = "ddim", n: int = 16, steps: int | None = None, *,
           eta: float = 0.0, clip_x0: bool = False, rederive_eps: bool = False,      # the solver
           y=None, guidance: float = 0.0,                                            # the class
           x_T: torch.Tensor | None = None, t_start: int | None = None,              # the start
           seed: int | None = 0, generator: torch.Generator | None = None, device=None,
           record=(), progress: bool = True) -> SampleResult:                         # what is kept
    """n samples with one of ``SOLVERS``: one loop, one network call per step, the update done by
    that method's step function.

    The solver. ``method``: "ddpm" (:func:`diffusion.p_sample`, Algorithm 2: every one of the
    T steps), "ddim" (:func:`ddim_step`, ``eta`` 0 deterministic .. 1 DDPM's variance) or
    "dpm++2m" (:func:`dpmpp_2m_step`); ``steps``: how many network calls (DDIM and DPM-Solver++,
    default 50). ``clip_x0`` clips hat-x_0 to [-1, 1] at every step; with ``rederive_eps``
    DDIM's direction term uses the noise the clipped hat-x_0 implies (:func:`estimates`; DDPM's
    and DPM-Solver++'s steps read only hat-x_0 then, so they do not change).
    The class: ``y`` (a class index or (n,) indices) and ``guidance`` w: classifier-free
    guidance, :func:`guided_output`.
    The start: x_T ~ N(0, I) from ``seed`` (or ``generator``), or the given ``x_T``; with
    ``t_start``, a given x_t at that step (e.g. a real image noised with Eq. 4: the
    partial-noise experiment of chapter 06). ``device``: default the model's.
    What is kept: ``record``, the timestep indices at which x_t and hat-x_0 are kept (the
    trajectory the book shows on a slider); ``progress`` shows a progress bar.
    """
    device = torch.device(device or next(model.parameters()).device)
    x, generator = _start(model, n, seed, generator, x_T, device)                # Algorithm 2, line 1
    y = None if y is None else torch.as_tensor(y, dtype=torch.long).expand(n).to(device)
    schedule = schedule.to(device)
    taus = timesteps(method, schedule.T, steps, t_start)
    draws = {"ddpm": len(taus) - 1, "ddim": len(taus) if eta else 0, "dpm++2m": 0}[method]
    noise = noise_stream(generator, x.shape, device, draws)
    record, out, previous = set(int(r) for r in record), SampleResult(images=x), None
    for i, t_index in enumerate(tqdm(taus, desc=f"{LABELS[method]} {len(taus)} steps", disable=not progress,
                                     mininterval=2.0)):
        s_index = taus[i + 1] if i + 1 < len(taus) else None
        t = torch.full((n,), t_index, device=device, dtype=torch.long)
        output = guided_output(model, x, t, y, guidance)                         # 1. the network's output
        eps_hat, x0_hat = estimates(schedule, x, t, output, clip_x0, rederive_eps)   # 2. hat-eps, hat-x_0
        if t_index in record:
            out.trajectory[t_index] = x.cpu()
            out.x0_trajectory[t_index] = x0_hat.clamp(-1, 1).cpu()
        if method == "ddpm":                                                     # 3. the step to s
            x = p_sample(schedule, x, t, output, next(noise) if t_index else torch.zeros_like(x), clip_x0)[0]
        elif method == "ddim":
            x = ddim_step(schedule, x, eps_hat, x0_hat, t_index, s_index, eta, next(noise, None))
        else:
            x = dpmpp_2m_step(schedule, x, x0_hat, t_index, s_index, previous)
            previous = (x0_hat, lambda_step(schedule, t_index, s_index)) if s_index is not None else None
    out.raw, out.images = x.cpu(), x.clamp(-1, 1).cpu()
    return out


def check_request(model, schedule: NoiseSchedule, method, n, steps, eta, clip_x0, rederive_eps, y, guidance,
                  x_T, t_start, seed, generator, device, record, progress) -> None:
    """The door of :func:`sample`: every argument checked before the first network call, each
    error naming the argument and what it must be."""
    if method not in SOLVERS:
        raise ValueError(f"method must be one of {SOLVERS}, got {method!r}")
    n = check_int(n, "n (the number of samples)", minimum=1)
    if seed is not None:
        check_int(seed, "seed")
    model_T = getattr(model, "T", None)
    if model_T is not None and model_T != schedule.T:
        raise ValueError(f"the model was trained with T = {model_T} diffusion steps but the schedule has "
                         f"T = {schedule.T}: sample with the schedule it was trained with (its "
                         "checkpoint's DiffusionConfig: NoiseSchedule.from_config)")
    if t_start is not None:
        check_int(t_start, "t_start")
    if steps is not None:
        check_int(steps, "steps")
        if method == "ddpm":
            raise ValueError("DDPM takes every step from t_start down to 0: leave steps out, or use "
                             "method='ddim' for fewer steps (eta=1 is DDPM's variance on a sub-sequence)")
    timesteps(method, schedule.T, steps, t_start)                # steps and t_start in range
    if not 0.0 <= check_number(eta, "eta") <= 1.0:          # also refuses NaN
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM's variance), got {eta}")
    if method != "ddim" and eta:
        raise ValueError(f"eta applies to DDIM only; {method} has its own noise (DDPM) or none (DPM-Solver++)")
    if rederive_eps and not clip_x0:
        raise ValueError("rederive_eps re-derives the noise from the clipped hat-x_0: it needs clip_x0=True")
    shape = (n, model.config.in_channels, model.config.image_size, model.config.image_size)
    if x_T is not None and (not isinstance(x_T, torch.Tensor) or tuple(x_T.shape) != shape):
        raise ValueError(f"x_T must have shape {shape}, got "
                         f"{tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__}")
    _check_class(model, y, n, guidance)


def _check_class(model, y, n: int, guidance) -> None:
    """The class request: y None, an int or (n,) integer indices in [0, K), and w finite >= 0."""
    if not 0.0 <= check_number(guidance, "guidance") < math.inf:
        raise ValueError(f"guidance scale w must be a finite number >= 0, got {guidance}")
    if y is None:
        if guidance:
            raise ValueError("guidance needs a class to guide towards (y / --class)")
        return
    K = model.config.num_classes
    if not K:
        raise ValueError("this checkpoint has no class embedding (an unconditional model): sample it "
                         "without a class, or train one with `python -m ddpm_tutorial train --conditional`")
    labels = torch.as_tensor(y)
    if labels.is_floating_point() or labels.shape not in ((), (n,)) or int(labels.min()) < 0 or int(labels.max()) >= K:
        raise ValueError(f"y must be one class index in [0, {K}) or {n} of them, got {labels.tolist()!r:.60}")


sample = door(sample, check_request)


def ddpm_sample(model, schedule: NoiseSchedule, n: int = 16, **kwargs) -> SampleResult:
    """Algorithm 2 with every one of the T steps: :func:`sample` with :func:`diffusion.p_sample`."""
    return sample(model, schedule, "ddpm", n=n, **kwargs)


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
