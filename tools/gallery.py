"""The gallery of broken runs (book/gallery.md, "When the samples look wrong"): typical mistakes,
each injected by one small named function below, run for real and drawn beside the healthy run.

    OMP_NUM_THREADS=1 python tools/gallery.py            # cpu settings: runs/gallery_cpu.pt, book/gallery/
    DDPM_QUICK=1 python tools/gallery.py --out /tmp/g    # tiny settings, seconds (tests/test_gallery.py)

Two kinds of mistake:

- **in training** (data left in [0, 1], Eq. 4 without its square roots, a learning rate 10x too
  high, skips saved after downsampling): each trains the cpu preset's network for a short budget
  beside a healthy run of the same budget, then samples it with the book's DDIM;
- **in sampling** (the sign of the noise term flipped in Algorithm 2, the network told t + 1,
  no clamp before the image is written, the network left in training mode, the raw weights
  instead of the EMA's, and the textured samples the book's own grids show): these need no
  training; they sample the checkpoint shipped with the package (the quick settings use their own
  tiny healthy run instead).

The package is never changed: a mistake is a function that swaps one thing (the data, the
schedule the trainer's Eq. 4 reads, ``sampling.p_sample`` for the length of one run, a wrapper
around the network). Finished runs are cached (``runs/gallery_<settings>.pt``) and reused while the
settings are unchanged, so an interrupted run resumes and the figures can be redrawn for free.
The page's numbers are written by :func:`write_outputs` (one markdown file per entry, included by
the page, and ``numbers.json``), never typed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from ddpm_tutorial import ablation, diffusion, metrics, sampling  # noqa: E402
from ddpm_tutorial.checkpoint import load_checkpoint_dict, model_from_checkpoint, save_checkpoint  # noqa: E402
from ddpm_tutorial.config import DiffusionConfig, ModelConfig, TrainConfig, get_preset, is_quick  # noqa: E402
from ddpm_tutorial.data import load_fashion_mnist, to_unit  # noqa: E402
from ddpm_tutorial.runinfo import hardware_summary  # noqa: E402
from ddpm_tutorial.schedules import NoiseSchedule  # noqa: E402
from ddpm_tutorial.train import build_trainer  # noqa: E402
from ddpm_tutorial.unet import UNet  # noqa: E402
from ddpm_tutorial.viz import grid_array  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --- settings ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    name: str                 # "cpu" or "quick": names the cache file
    model: ModelConfig        # the network every training run builds
    diffusion: DiffusionConfig
    train: TrainConfig        # the healthy recipe; each training mistake changes one thing in it
    n_score: int              # DDIM samples scored per trained model (FD with its spread)
    ddim_steps: int           # the book's default fast sampler
    score_eta: float          # DDIM's eta for the trained models: 1, the best 50-call sampler of chapter 6
                              # (with eta = 0 a short run's samples carry its x_T's texture: the last entry)
    n_ddpm: int               # Algorithm 2 samples per run of the sampling mistakes
    n_sign: int               # samples of the sign-flipped chain (it needs no score)
    n_garbage: int            # DDIM samples of the shipped model in the texture count
    n_real: int               # real images behind the texture threshold (and as many to check it)
    n_grid: int = 16          # images per grid
    n_boot: int = 200         # bootstrap resamples behind each FD spread
    shipped: bool = True      # sampling mistakes on the shipped checkpoint (else: the healthy run)
    chunk: int = 50           # images per network call when sampling (CPU caches: see chapter 6)


def settings_for(quick: bool) -> Settings:
    """The cpu preset's network and recipe cut to a short budget, or tiny settings for the test."""
    if quick:
        return Settings("quick", model=ModelConfig(base_channels=8, channel_mults=(1, 2)),
                        diffusion=DiffusionConfig(T=20),
                        train=TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, ema_decay=0.5,
                                          subset=64),
                        n_score=16, ddim_steps=4, score_eta=1.0, n_ddpm=8, n_sign=4, n_garbage=16, n_real=200, n_grid=8,
                        n_boot=4, shipped=False, chunk=16)
    cpu = get_preset("cpu")
    return Settings("cpu", model=cpu.model, diffusion=cpu.diffusion,
                    train=dataclasses.replace(cpu.train, steps=600),
                    n_score=250, ddim_steps=cpu.ddim_steps, score_eta=1.0, n_ddpm=100, n_sign=16, n_garbage=500, n_real=2000,
                    n_boot=cpu.n_bootstrap)


# --- the mistakes: training -------------------------------------------------------------------
# Each takes (model config, train config) before the trainer is built, or the trainer after.

def data_left_in_unit_range(trainer) -> None:
    """The images in [0, 1]: the loader's ``2 * x - 1`` forgotten (``x / 255`` and nothing more).

    The package's Trainer refuses such data in its constructor (troubleshooting page); the check
    runs once, so swapping the data afterwards trains exactly what a loop without it would."""
    trainer.data = (trainer.data + 1) / 2


def eq4_without_square_roots(trainer) -> None:
    """Eq. 4 written without its square roots, in training only:

        x_t = bar-alpha_t x_0 + (1 - bar-alpha_t) eps        (should be sqrt(bar-alpha_t), sqrt(1 - bar-alpha_t))

    ``q_sample`` reads these two coefficients from the trainer's schedule; sampling later reads
    the right ones, as a sampler written from the paper would."""
    s = trainer.schedule
    trainer.schedule = dataclasses.replace(s, sqrt_alpha_bar=s.alpha_bar, sqrt_one_minus_alpha_bar=1 - s.alpha_bar)


def learning_rate_10x(model: ModelConfig, train: TrainConfig):
    """The peak learning rate ten times the recipe's (1e-2 instead of 1e-3 for the cpu preset)."""
    return model, dataclasses.replace(train, lr=10 * train.lr)


def skips_after_downsampling(model: ModelConfig, train: TrainConfig):
    """The U-Net's skips saved after each downsampling (``skip="post"``), not before: chapter 7's variant."""
    return dataclasses.replace(model, skip="post"), train


# --- the mistakes: sampling -------------------------------------------------------------------

def p_sample_noise_sign_flipped(schedule, xt, t, eps_theta, z=None, clip_x0=False):
    """Algorithm 2, line 4 with a plus where the paper has a minus:

        x_{t-1} = 1/sqrt(alpha_t) (x_t + beta_t / sqrt(1 - bar-alpha_t) eps_theta) + sigma_t z

    i.e. the package's step given -eps_theta: the predicted noise is added instead of removed."""
    return diffusion.p_sample(schedule, xt, t, -eps_theta, z, clip_x0=clip_x0)


class NetworkToldTPlusOne(nn.Module):
    """The network asked about t + 1 while the step's coefficients are read at t: trained on code
    indices 0..T-1 and sampled with the paper's 1..T (``for t in range(T, 0, -1): model(x, t)``,
    with ``alpha[t - 1]`` in the update). At t = T the network meets a timestep it never trained
    on; a network without the package's range check accepts it, so this copy's bound is raised."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = copy.deepcopy(net)
        self.net.T = net.T + 1            # the range check's bound, not the schedule: nothing else reads it
        self.config = net.config

    def forward(self, x, t, y=None):
        return self.net(x, t + 1)


class NetworkInTrainMode(nn.Module):
    """The network run in training mode at sampling time (``model.eval()`` forgotten): what changes
    is every module whose forward reads ``self.training`` (BatchNorm, dropout)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.config = net, net.config

    def forward(self, x, t, y=None):
        self.net.train()                 # the sampler calls .eval() on this wrapper; the mistake undoes it
        return self.net(x, t)


def png_bytes_without_clamp(x: torch.Tensor) -> torch.Tensor:
    """The image written without ``clamp(-1, 1)``: ``((x + 1) * 127.5).round()`` cast to 8 bits,
    which wraps around (256 -> 0, -1 -> 255). (N, C, H, W) float -> uint8."""
    return ((x + 1) * 127.5).round().long().to(torch.uint8)


def png_bytes(x: torch.Tensor) -> torch.Tensor:
    """The same conversion with the clamp: what ``sampling`` returns and ``viz`` writes."""
    return png_bytes_without_clamp(x.clamp(-1, 1))


def mode_dependent_modules(net: nn.Module) -> list:
    """The modules whose output depends on train/eval mode: batch norms, and dropout with p > 0."""
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm2d)
    return [name for name, m in net.named_modules()
            if isinstance(m, norms) or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)]


@contextlib.contextmanager
def sampler_step(step):
    """Run the package's DDPM loop with another ``p_sample`` (the loop itself unchanged)."""
    original = sampling.p_sample
    sampling.p_sample = step
    try:
        yield
    finally:
        sampling.p_sample = original


def recording(step, log: list):
    """``step`` that also appends (t, max |x_{t-1}|, std of x_{t-1}) after every call."""
    def wrapped(schedule, xt, t, eps_theta, z=None, clip_x0=False):
        x_prev, x0_hat = step(schedule, xt, t, eps_theta, z, clip_x0=clip_x0)
        log.append((int(t[0]), x_prev.abs().max().item(), x_prev.std().item()))
        return x_prev, x0_hat
    return wrapped


@dataclass(frozen=True)
class TrainingMistake:
    key: str
    configure: object = None     # (ModelConfig, TrainConfig) -> (ModelConfig, TrainConfig), before building
    inject: object = None        # (Trainer) -> None, after building


TRAINING = (TrainingMistake("healthy"),
            TrainingMistake("data_range", inject=data_left_in_unit_range),
            TrainingMistake("no_sqrt", inject=eq4_without_square_roots),
            TrainingMistake("lr_10x", configure=learning_rate_10x),
            TrainingMistake("skip_post", configure=skips_after_downsampling))


# --- measures ---------------------------------------------------------------------------------

def foreground_texture(images: torch.Tensor) -> torch.Tensor:
    """Per image (N,): the mean absolute difference between neighbouring pixels (on the [0, 1]
    scale) over pairs where both pixels belong to the garment (brighter than 0.1), not the black
    background. Smooth garments score low, blotchy black-and-white textures high."""
    u = to_unit(images)
    m = (u > 0.1).float()
    dh = (u[..., 1:, :] - u[..., :-1, :]).abs() * m[..., 1:, :] * m[..., :-1, :]
    dw = (u[..., :, 1:] - u[..., :, :-1]).abs() * m[..., :, 1:] * m[..., :, :-1]
    pairs = (m[..., 1:, :] * m[..., :-1, :]).sum((1, 2, 3)) + (m[..., :, 1:] * m[..., :, :-1]).sum((1, 2, 3))
    return (dh.sum((1, 2, 3)) + dw.sum((1, 2, 3))) / pairs.clamp(min=1)


def high_pass(x: torch.Tensor) -> torch.Tensor:
    """x minus its 3x3 local mean: the fine detail of (N, C, H, W) images."""
    return x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def noise_imprint(images: torch.Tensor, x_T: torch.Tensor) -> torch.Tensor:
    """Per image (N,): the correlation between the fine detail of a sample and of the noise x_T it
    started from. 0 when the image owes its detail nothing to x_T's (e.g. x_T of another image)."""
    a, b = high_pass(images).flatten(1), high_pass(x_T).flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-12)


def wilson(k: int, n: int, z: float = 1.96) -> tuple:
    """The Wilson score interval of a proportion k / n (95 % for z = 1.96)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def quality(images: torch.Tensor, n_boot: int) -> dict:
    """metrics.sample_quality as a dict, plus the mean pixel on the [0, 1] scale (the metric warns
    about images that are all >= 0, which a broken run may produce: that is the point here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = metrics.sample_quality(images, n_boot=n_boot).as_dict()
    q["mean_pixel"] = to_unit(images).mean().item()
    return q


# --- runs (cached) ----------------------------------------------------------------------------

class Cache:
    """Finished runs in one file under runs/, kept while the settings are unchanged: an item is
    computed once, saved at once (atomically), and read back on every later call."""

    def __init__(self, path: Path, key: dict):
        self.path, self.key, self.items, self.computed = Path(path), key, {}, []
        if self.path.exists():
            stored = load_checkpoint_dict(self.path)
            if stored.get("key") == key:
                self.items = stored["items"]

    def get(self, name: str, compute):
        if name not in self.items:
            start = time.perf_counter()
            value = compute()
            value["seconds"] = time.perf_counter() - start
            self.items[name] = value
            self.computed.append(name)
            save_checkpoint(self.path, {"key": self.key, "items": self.items})
        return self.items[name]


def cache_key(settings: Settings) -> dict:
    return ablation.as_stored(dataclasses.asdict(settings))


def x_T_of(settings: Settings, n: int, seed: int) -> torch.Tensor:
    """Algorithm 2, line 1 for n images, seeded: every run of an entry starts from the same noise."""
    cfg = settings.model
    return torch.randn((n, cfg.in_channels, cfg.image_size, cfg.image_size), generator=torch.Generator().manual_seed(seed))


def draw(model, schedule, settings: Settings, n: int, method: str = "ddim", seed: int = 0, eta: float = 0.0,
         steps: int | None = None) -> dict:
    """n samples in chunks (chunk i seeded with seed * 1000 + i, so the fresh noise of DDPM and
    of DDIM with eta > 0 is the same for every variant): images (clamped) and raw (unclamped)."""
    x_T = x_T_of(settings, n, seed)
    images, raw = [], []
    for i, chunk in enumerate(x_T.split(settings.chunk)):
        common = dict(n=len(chunk), x_T=chunk, seed=seed * 1000 + i, progress=False)
        if method == "ddpm":
            out = sampling.ddpm_sample(model, schedule, **common)
        else:
            out = sampling.ddim_sample(model, schedule, steps=steps or settings.ddim_steps, eta=eta, **common)
        images.append(out.images)
        raw.append(out.raw)
    return {"images": torch.cat(images), "raw": torch.cat(raw)}


def train_run(settings: Settings, mistake: TrainingMistake, data: torch.Tensor) -> dict:
    """Train the settings' network with one mistake (or none); a run whose loss turns NaN stops
    there (the package refuses a NaN step), and keeps the weights of its last finite step."""
    model_cfg, train_cfg = settings.model, settings.train
    if mistake.configure:
        model_cfg, train_cfg = mistake.configure(model_cfg, train_cfg)
    preset = dataclasses.replace(get_preset("cpu"), diffusion=settings.diffusion)
    trainer = build_trainer(preset, data, "cpu", model=model_cfg, train=train_cfg)
    if mistake.inject:
        mistake.inject(trainer)
    diverged = None
    try:
        trainer.fit(progress=False)
    except FloatingPointError:
        diverged = trainer.step
    return {"loss": list(trainer.history.loss), "diverged_at": diverged, "steps": trainer.step,
            "model": dataclasses.asdict(model_cfg), "lr": train_cfg.lr,
            "ema": {k: v.clone() for k, v in trainer.ema.module.state_dict().items()},
            "raw": {k: v.clone() for k, v in trainer.model.state_dict().items()}}


def network(run: dict, weights: str = "ema", T: int = 1000) -> UNet:
    net = UNet(ModelConfig(**run["model"]), T=T)
    net.load_state_dict(run[weights])
    return net.eval()


def run_all(settings: Settings, cache: Cache, log=print) -> dict:
    """Every run of the gallery, from the cache where it is there. Returns {name: item}."""
    schedule = NoiseSchedule.from_config(settings.diffusion)
    T = settings.diffusion.T
    data = None
    runs = {}
    for mistake in TRAINING:
        def compute(mistake=mistake):
            nonlocal data
            if data is None:
                data = load_fashion_mnist(train=True, subset=settings.train.subset)[0]
            log(f"training: {mistake.key}")
            return train_run(settings, mistake, data)
        runs[f"train/{mistake.key}"] = cache.get(f"train/{mistake.key}", compute)

    def scored(run, weights):
        def compute():
            log(f"sampling DDIM (eta {settings.score_eta:g}): {weights}")
            out = draw(network(run, weights, T), schedule, settings, settings.n_score, seed=1,
                       eta=settings.score_eta)
            return {"images": out["images"], "quality": quality(out["images"], settings.n_boot)}
        return compute

    for mistake in TRAINING:
        key = mistake.key
        runs[f"ddim/{key}"] = cache.get(f"ddim/{key}", scored(runs[f"train/{key}"], "ema"))
    runs["ddim/healthy_raw"] = cache.get("ddim/healthy_raw", scored(runs["train/healthy"], "raw"))

    # The sampling mistakes: the shipped checkpoint (quick: the healthy run's EMA network).
    if settings.shipped:
        model, ship_schedule, ckpt = model_from_checkpoint()
        ship_desc = f"the shipped checkpoint ({ckpt['step']} steps of the cpu preset)"
    else:
        model, ship_schedule = network(runs["train/healthy"], "ema", T), schedule
        ship_desc = "the quick settings' healthy run"
    runs["shipped"] = {"description": ship_desc, "T": ship_schedule.T}

    def ddpm(step, n, wrap=None, score=True):
        def compute():
            log(f"sampling DDPM-{ship_schedule.T}: {getattr(step, '__name__', step)} {wrap.__name__ if wrap else ''}")
            trace = []
            with sampler_step(recording(step, trace)):
                out = draw(wrap(model) if wrap else model, ship_schedule, settings, n, method="ddpm", seed=2)
            out["trace"] = trace[:ship_schedule.T]          # the first chunk's chain
            if score:
                out["quality"] = quality(out["images"], settings.n_boot)
            return out
        return compute

    runs["ddpm/healthy"] = cache.get("ddpm/healthy", ddpm(diffusion.p_sample, settings.n_ddpm))
    runs["ddpm/t_plus_one"] = cache.get("ddpm/t_plus_one", ddpm(diffusion.p_sample, settings.n_ddpm,
                                                                 NetworkToldTPlusOne))
    runs["ddpm/sign_flip"] = cache.get("ddpm/sign_flip", ddpm(p_sample_noise_sign_flipped, settings.n_sign,
                                                               score=False))

    def train_mode():
        log("sampling in train mode")
        ev = draw(model, ship_schedule, settings, settings.n_grid, seed=3)
        tr = draw(NetworkInTrainMode(model), ship_schedule, settings, settings.n_grid, seed=3)
        model.eval()
        return {"eval": ev["images"], "train": tr["images"],
                "max_diff": (ev["raw"] - tr["raw"]).abs().max().item(),
                "mode_modules": mode_dependent_modules(model),
                "dropout_p": sorted({m.p for m in model.modules() if isinstance(m, nn.Dropout)})}
    runs["train_mode"] = cache.get("train_mode", train_mode)

    def garbage(eta):
        def compute():
            log(f"sampling DDIM eta {eta} for the texture count")
            out = draw(model, ship_schedule, settings, settings.n_garbage, seed=4, eta=eta)
            return {"images": out["images"], "raw": out["raw"]}
        return compute
    runs["garbage/eta0"] = cache.get("garbage/eta0", garbage(0.0))
    runs["garbage/eta1"] = cache.get("garbage/eta1", garbage(1.0))
    return runs


# --- numbers ----------------------------------------------------------------------------------

def final_loss(run: dict, last: int = 100) -> float:
    tail = run["loss"][-last:]
    return sum(tail) / len(tail)


def numbers(settings: Settings, runs: dict) -> dict:
    """Every number the page shows, computed from the runs."""
    healthy = runs["train/healthy"]
    n_fd = len([m for m in TRAINING if m.key != "healthy"]) + 2     # FD comparisons on the page
    z = statistics.NormalDist().inv_cdf(1 - 0.025 / n_fd)             # Bonferroni: 5 % for the family
    out = {"settings": {"steps": settings.train.steps, "batch": settings.train.batch_size, "lr": settings.train.lr,
                        "n_score": settings.n_score, "ddim_steps": settings.ddim_steps, "score_eta": settings.score_eta, "n_ddpm": settings.n_ddpm,
                        "n_garbage": settings.n_garbage, "T_ship": runs["shipped"]["T"],
                        "shipped": runs["shipped"]["description"], "z": z, "n_fd": n_fd},
           "real_mean_pixel": to_unit(metrics.real_subset(settings.n_real)).mean().item()}

    def fd_cmp(a: dict, b: dict) -> dict:
        diff, spread = a["fd"] - b["fd"], math.hypot(a["fd_std"], b["fd_std"])
        return {"diff": diff, "spread": spread, "beyond": abs(diff) > z * spread}

    hq = runs["ddim/healthy"]["quality"]
    out["healthy"] = {"final_loss": final_loss(healthy), "fd": hq["fd"], "fd_std": hq["fd_std"],
                      "floor": hq["fd_real"], "floor_std": hq["fd_real_std"], "noise": hq["fd_noise"],
                      "mean_pixel": hq["mean_pixel"], "confidence": hq["confidence"],
                      "train_seconds": healthy["seconds"]}
    for m in TRAINING[1:]:
        run, q = runs[f"train/{m.key}"], runs[f"ddim/{m.key}"]["quality"]
        out[m.key] = {"final_loss": final_loss(run), "fd": q["fd"], "fd_std": q["fd_std"],
                      "mean_pixel": q["mean_pixel"], "confidence": q["confidence"],
                      "diverged_at": run["diverged_at"], "steps": run["steps"], "lr": run["lr"],
                      "max_loss": max(run["loss"]), "vs_healthy": fd_cmp(q, hq)}
    rq = runs["ddim/healthy_raw"]["quality"]
    out["no_ema"] = {"fd": rq["fd"], "fd_std": rq["fd_std"], "mean_pixel": rq["mean_pixel"],
                     "ema_decay": settings.train.ema_decay, "vs_healthy": fd_cmp(rq, hq)}

    ok, off = runs["ddpm/healthy"], runs["ddpm/t_plus_one"]
    a, b = to_unit(ok["images"]), to_unit(off["images"])
    out["t_plus_one"] = {"pixel_diff": (a - b).abs().mean().item(),
                         "pixel_diff_other": (a - a.roll(1, 0)).abs().mean().item()}
    if "quality" in ok and "quality" in off:
        out["t_plus_one"].update(fd=off["quality"]["fd"], fd_std=off["quality"]["fd_std"],
                                 fd_healthy=ok["quality"]["fd"], fd_healthy_std=ok["quality"]["fd_std"],
                                 floor=ok["quality"]["fd_real"], vs_healthy=fd_cmp(off["quality"], ok["quality"]))

    flip = runs["ddpm/sign_flip"]
    trace_ok = ok["trace"]
    big = next((t for t, mx, _ in flip["trace"] if mx > 10), None)     # the step's x_{t-1}: paper t = index
    out["sign_flip"] = {"max_abs": flip["raw"].abs().max().item(), "max_abs_healthy": ok["raw"].abs().max().item(),
                        "saturated": (flip["images"].abs() >= 1).float().mean().item(),
                        "saturated_healthy": (ok["images"].abs() >= 1).float().mean().item(),
                        "first_t_over_10": big,
                        "std_end": flip["trace"][-1][2], "std_end_healthy": trace_ok[-1][2]}

    def overshoot(raw):
        outside = (raw.abs() > 1).float().mean().item()
        wrapped = (png_bytes_without_clamp(raw) != png_bytes(raw)).float().mean().item()
        return {"outside": outside, "max_abs": raw.abs().max().item(), "wrapped": wrapped}
    out["no_clamp"] = {"ddpm": overshoot(ok["raw"]), "ddim": overshoot(runs["garbage/eta0"]["raw"])}

    tm = runs["train_mode"]
    out["train_mode"] = {"max_diff": tm["max_diff"], "mode_modules": len(tm["mode_modules"]),
                         "dropout_p": tm["dropout_p"]}

    # Textured samples: thresholds at percentiles of the real test images' foreground texture; a
    # disjoint set of real (training) images shows how many real images each one flags.
    real_tex = foreground_texture(metrics.real_subset(settings.n_real))
    real_check = foreground_texture(metrics.real_subset(settings.n_real, seed=1, train=True))
    levels = (0.75, 0.9, 0.95)
    thresholds = {q: real_tex.quantile(q).item() for q in levels}
    main = thresholds[0.9]
    rows = {"real": {"n": len(real_check), "rates": [(real_check > thresholds[q]).float().mean().item() for q in levels]}}
    sets = {"ddim_eta0": (runs["garbage/eta0"]["images"], x_T_of(settings, settings.n_garbage, 4)),
            "ddim_eta1": (runs["garbage/eta1"]["images"], x_T_of(settings, settings.n_garbage, 4)),
            "ddpm": (ok["images"], x_T_of(settings, settings.n_ddpm, 2))}
    for name, (images, x_T) in sets.items():
        tex = foreground_texture(images)
        flagged = tex > main
        imprint = noise_imprint(images, x_T)
        _, logits = metrics.classifier_features(images)
        confidence = logits.softmax(1).amax(1)
        k, n = int(flagged.sum()), len(images)

        def mean(v, mask):
            return v[mask].mean().item() if mask.any() else float("nan")
        rows[name] = {"k": k, "n": n, "rate": k / n, "ci": wilson(k, n),
                      "rates": [(tex > thresholds[q]).float().mean().item() for q in levels],
                      "imprint_flagged": mean(imprint, flagged), "imprint_rest": mean(imprint, ~flagged),
                      "imprint_all": imprint.mean().item(),
                      "imprint_shuffled": noise_imprint(images, x_T.roll(1, 0)).mean().item(),
                      "confidence_flagged": mean(confidence, flagged), "confidence_rest": mean(confidence, ~flagged),
                      "corr_texture_imprint": torch.corrcoef(torch.stack([tex, imprint]))[0, 1].item()}
    out["garbage"] = {"levels": list(levels), "thresholds": [thresholds[q] for q in levels], "main_level": 0.9,
                      "n_real": settings.n_real, **rows}
    return out


# --- figures ----------------------------------------------------------------------------------

def _grid(ax, images, title, n):
    ax.imshow(grid_array(images[:n], nrow=int(math.sqrt(n)) or 1), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _loss_panel(ax, runs, key, label):
    for name, colour, text in (("healthy", "tab:blue", "healthy"), (key, "tab:red", label)):
        loss = torch.tensor(runs[f"train/{name}"]["loss"])
        w = max(1, min(25, len(loss) // 10))
        smooth = F.avg_pool1d(loss[None, None], w, 1).flatten() if len(loss) >= w else loss
        ax.plot(torch.arange(len(smooth)) + w, smooth, color=colour, label=text, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("training step", fontsize=8)
    ax.set_ylabel(f"loss (running mean)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)


def figures(settings: Settings, runs: dict, nums: dict, out: Path) -> list:
    """One PNG per entry in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    n = settings.n_grid
    written = []

    def save(fig, name):
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)

    labels = {"data_range": "data in [0, 1]", "no_sqrt": "Eq. 4 without square roots",
              "lr_10x": "learning rate x10", "skip_post": "skips after downsampling"}
    for key, label in labels.items():
        fig, axes = plt.subplots(1, 3, figsize=(9.5, 3.2), gridspec_kw={"width_ratios": [1.4, 1, 1]})
        _loss_panel(axes[0], runs, key, label)
        _grid(axes[1], runs["ddim/healthy"]["images"], "healthy", n)
        _grid(axes[2], runs[f"ddim/{key}"]["images"], label, n)
        save(fig, key)

    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    _grid(axes[0], runs["ddim/healthy"]["images"], "EMA weights", n)
    _grid(axes[1], runs["ddim/healthy_raw"]["images"], "raw weights of the last step", n)
    save(fig, "no_ema")

    ok, flip, off = runs["ddpm/healthy"], runs["ddpm/sign_flip"], runs["ddpm/t_plus_one"]
    fig, axes = plt.subplots(1, 3, figsize=(9.5, 3.2), gridspec_kw={"width_ratios": [1.4, 1, 1]})
    for trace, colour, text in ((ok["trace"], "tab:blue", "healthy"), (flip["trace"], "tab:red", "sign flipped")):
        axes[0].plot([t for t, _, _ in trace], [s for _, _, s in trace], color=colour, label=text)
    axes[0].set_xlim(runs["shipped"]["T"], 0)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("t (sampling runs right to left)", fontsize=8)
    axes[0].set_ylabel("std of x_t", fontsize=8)
    axes[0].tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    _grid(axes[1], ok["images"], "healthy", min(n, len(flip["images"])))
    _grid(axes[2], flip["images"], "noise term's sign flipped", min(n, len(flip["images"])))
    save(fig, "sign_flip")

    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    _grid(axes[0], ok["images"], "network told t", n)
    _grid(axes[1], off["images"], "network told t + 1", n)
    save(fig, "t_plus_one")

    raw = runs["garbage/eta0"]["raw"]
    fig, axes = plt.subplots(1, 3, figsize=(9.5, 3.2), gridspec_kw={"width_ratios": [1.4, 1, 1]})
    values = raw.flatten()
    axes[0].hist(values.clamp(-1.6, 1.6).numpy(), bins=80, color="tab:gray", log=True)
    for edge in (-1, 1):
        axes[0].axvline(edge, color="tab:red", lw=1)
    axes[0].set_xlabel("sampled pixel value before the clamp", fontsize=8)
    axes[0].tick_params(labelsize=7)
    wrapped = png_bytes_without_clamp(raw[:n]).float() / 127.5 - 1
    _grid(axes[1], raw[:n].clamp(-1, 1), "clamped, then written", n)
    _grid(axes[2], wrapped, "written without the clamp", n)
    save(fig, "no_clamp")

    tm = runs["train_mode"]
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    _grid(axes[0], tm["eval"], "model.eval()", n)
    _grid(axes[1], tm["train"], "model.train()", n)
    save(fig, "train_mode")

    g = nums["garbage"]
    imgs = runs["garbage/eta0"]["images"]
    tex = foreground_texture(imgs)
    order = tex.argsort(descending=True)
    fig, axes = plt.subplots(1, 4, figsize=(12.5, 3.2), gridspec_kw={"width_ratios": [1.4, 1, 1, 1]})
    real_tex = foreground_texture(metrics.real_subset(settings.n_real))
    bins = torch.linspace(0, max(real_tex.max().item(), tex.max().item()), 40).numpy()
    axes[0].hist(real_tex.numpy(), bins=bins, density=True, alpha=0.5, label="real test images")
    axes[0].hist(tex.numpy(), bins=bins, density=True, alpha=0.5, label="DDIM samples, eta = 0")
    axes[0].axvline(g["thresholds"][g["levels"].index(g["main_level"])], color="tab:red", lw=1,
                    label="real 90th percentile")
    axes[0].set_xlabel("foreground texture", fontsize=8)
    axes[0].tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    _grid(axes[1], imgs[order[:n]], "most textured (eta = 0)", n)
    _grid(axes[2], runs["garbage/eta1"]["images"][order[:n]], "the same x_T, eta = 1", n)
    _grid(axes[3], imgs[order[len(order) // 2:len(order) // 2 + n]], "around the median (eta = 0)", n)
    save(fig, "garbage")
    return written


# --- the page's text --------------------------------------------------------------------------

def _fd(v, s):
    return f"{v:.1f} ± {s:.1f}"


def _verdict(c: dict, z: float) -> str:
    rel = "beyond" if c["beyond"] else "within"
    return f"difference {c['diff']:+.1f} ± {c['spread']:.1f}, {rel} {z:.2f} combined spreads"


def _pct(v):
    return f"{100 * v:.1f} %"


def snippets(nums: dict) -> dict:
    """The generated markdown of each entry: {name: text}. Every number comes from ``nums``."""
    s, h, z = nums["settings"], nums["healthy"], nums["settings"]["z"]
    fd_head = (f"FD at n = {s['n_score']} (DDIM-{s['ddim_steps']}, eta = {s['score_eta']:g}; real-vs-real floor "
               f"{_fd(h['floor'], h['floor_std'])})")
    out = {}

    def table(key, extra=()):
        e = nums[key]
        rows = ["| | healthy run | this mistake |", "|---|---:|---:|",
                f"| final training loss (mean of the last 100 steps) | {h['final_loss']:.4f} | {e['final_loss']:.4f} |",
                f"| {fd_head} | {_fd(h['fd'], h['fd_std'])} | {_fd(e['fd'], e['fd_std'])} |",
                f"| mean pixel, [0, 1] scale (real images: {nums['real_mean_pixel']:.3f}) | {h['mean_pixel']:.3f} "
                f"| {e['mean_pixel']:.3f} |",
                *extra]
        text = "\n".join(rows) + f"\n\nFD {_verdict(e['vs_healthy'], z)}."
        if e["diverged_at"] is not None:
            text += (f" The loss became NaN at step {e['diverged_at']:,d}: the package refuses that step, so the "
                     f"samples come from the weights of the last finite one.")
        return text

    out["data_range"] = table("data_range")
    out["no_sqrt"] = table("no_sqrt")
    e = nums["lr_10x"]
    out["lr_10x"] = table("lr_10x", (f"| peak learning rate | {s['lr']:g} | {e['lr']:g} |",
                                     f"| highest loss of any step | | {e['max_loss']:.3f} |"))
    out["skip_post"] = table("skip_post")
    e = nums["no_ema"]
    out["no_ema"] = ("| | EMA weights | raw weights |\n|---|---:|---:|\n"
                     f"| {fd_head} | {_fd(h['fd'], h['fd_std'])} | {_fd(e['fd'], e['fd_std'])} |\n"
                     f"| mean pixel, [0, 1] scale | {h['mean_pixel']:.3f} | {e['mean_pixel']:.3f} |\n\n"
                     f"FD {_verdict(e['vs_healthy'], z)} (the same run of {s['steps']:,d} steps; EMA decay "
                     f"{e['ema_decay']:g}).")
    e = nums["sign_flip"]
    first = (f"The largest $\\lvert x_t \\rvert$ passes 10 at $t$ = {e['first_t_over_10']:,d}"
             if e["first_t_over_10"] is not None else "The largest $\\lvert x_t \\rvert$ never passes 10")
    out["sign_flip"] = ("| | healthy | sign flipped |\n|---|---:|---:|\n"
                        f"| largest \\|x_0\\| before the clamp | {e['max_abs_healthy']:.3g} | {e['max_abs']:.3g} |\n"
                        f"| pixels at black or white after the clamp | {_pct(e['saturated_healthy'])} "
                        f"| {_pct(e['saturated'])} |\n"
                        f"| std of the final x_0 (first chunk) | {e['std_end_healthy']:.3g} | {e['std_end']:.3g} |\n\n"
                        f"{first}.")
    e = nums["t_plus_one"]
    text = (f"From the same $x_T$ and the same noise $z$ at every step, the images move by "
            f"{e['pixel_diff']:.3f} on average (pixels in [0, 1]), against {e['pixel_diff_other']:.3f} between the "
            f"images of two different $x_T$.")
    if "fd" in e:
        text += (f" FD at n = {s['n_ddpm']} (DDPM-{s['T_ship']}; floor {e['floor']:.1f}): "
                 f"{_fd(e['fd_healthy'], e['fd_healthy_std'])} told $t$, {_fd(e['fd'], e['fd_std'])} told $t + 1$: "
                 f"{_verdict(e['vs_healthy'], z)}.")
    out["t_plus_one"] = text
    e = nums["no_clamp"]
    out["no_clamp"] = ("| sampler | pixels outside [-1, 1] | largest \\|x_0\\| | pixels changed when written without "
                       "the clamp |\n|---|---:|---:|---:|\n"
                       f"| DDPM-{s['T_ship']} (n = {s['n_ddpm']}) | {_pct(e['ddpm']['outside'])} | "
                       f"{e['ddpm']['max_abs']:.3f} | {_pct(e['ddpm']['wrapped'])} |\n"
                       f"| DDIM-{s['ddim_steps']} (n = {s['n_garbage']}) | {_pct(e['ddim']['outside'])} | "
                       f"{e['ddim']['max_abs']:.3f} | {_pct(e['ddim']['wrapped'])} |")
    e = nums["train_mode"]
    out["train_mode"] = (f"Modules of this network whose output depends on the mode (batch norm, dropout with "
                         f"p > 0): {e['mode_modules']} (dropout p = {', '.join(f'{p:g}' for p in e['dropout_p'])}). "
                         f"Largest difference between the samples of the two modes from the same $x_T$: "
                         f"{e['max_diff']:.3g}.")
    g = nums["garbage"]
    names = {"ddim_eta0": f"DDIM-{s['ddim_steps']}, eta = 0", "ddim_eta1": f"DDIM-{s['ddim_steps']}, eta = 1",
             "ddpm": f"DDPM-{s['T_ship']}"}
    pct = [f"{round(100 * q)}th" for q in g["levels"]]
    main = g["levels"].index(g["main_level"])
    rows = ["| images | n | " + " | ".join(f"above the real {p} percentile" for p in pct) + " |",
            "|---|---:|" + "---:|" * len(pct),
            f"| real training images (the check) | {g['real']['n']:,d} | "
            + " | ".join(_pct(r) for r in g["real"]["rates"]) + " |"]
    for key, label in names.items():
        r = g[key]
        cells = [_pct(v) + (f" ({_pct(r['ci'][0])} to {_pct(r['ci'][1])})" if i == main else "")
                 for i, v in enumerate(r["rates"])]
        rows.append(f"| {label} | {r['n']:,d} | " + " | ".join(cells) + " |")
    what = [f"| images | x_T imprint: above the {pct[main]} percentile | the rest | x_T of another image "
            "| classifier confidence: above | the rest |", "|---|---:|---:|---:|---:|---:|"]
    for key, label in names.items():
        r = g[key]
        what.append(f"| {label} | {r['imprint_flagged']:.2f} | {r['imprint_rest']:.2f} | {r['imprint_shuffled']:.2f} "
                    f"| {r['confidence_flagged']:.2f} | {r['confidence_rest']:.2f} |")
    out["garbage_rate"] = ("\n".join(rows) + f"\n\nThe thresholds are percentiles of the foreground texture of "
                           f"{g['n_real']:,d} real test images ({', '.join(f'{t:.3f}' for t in g['thresholds'])}); "
                           f"the first row counts a disjoint set of real images, which a perfect sampler would "
                           f"match. The interval is the 95 % Wilson interval.")
    out["garbage_what"] = ("\n".join(what) + f"\n\nThe imprint is the correlation between a sample's fine detail and "
                           f"its own x_T's; the column \"x_T of another image\" pairs each sample with a neighbour's "
                           f"x_T instead, the value of no imprint. Across the DDIM (eta = 0) samples texture and "
                           f"imprint correlate at {g['ddim_eta0']['corr_texture_imprint']:.2f}.")
    out["healthy"] = (f"The healthy run: {s['steps']:,d} steps of batch {s['batch']} (peak learning rate "
                      f"{s['lr']:g}), final loss {h['final_loss']:.4f}, FD {_fd(h['fd'], h['fd_std'])} at n = "
                      f"{s['n_score']} with DDIM-{s['ddim_steps']} (eta = {s['score_eta']:g}) from its EMA weights (floor "
                      f"{_fd(h['floor'], h['floor_std'])}, clamped noise {h['noise']:.0f}). A difference counts when "
                      f"it exceeds {z:.2f} combined spreads: the {s['n_fd']} FD comparisons of this page share a 5 % "
                      f"chance of one false alarm (Bonferroni).")
    return out


def write_outputs(settings: Settings, runs: dict, out: Path, seconds: float | None = None) -> dict:
    """Figures, one markdown file per entry (the page includes them), numbers.json and run.md."""
    nums = numbers(settings, runs)
    figures(settings, runs, nums, out)
    for name, text in snippets(nums).items():
        (out / f"{name}.md").write_text(text + "\n")
    (out / "numbers.json").write_text(json.dumps(nums, indent=1, default=float) + "\n")
    train_min = sum(runs[f"train/{m.key}"]["seconds"] for m in TRAINING) / 60
    total_min = sum(v["seconds"] for k, v in runs.items() if isinstance(v, dict) and "seconds" in v) / 60
    (out / "run.md").write_text(
        f"Produced by `OMP_NUM_THREADS=1 python tools/gallery.py` ({settings.name} settings) on "
        f"{hardware_summary('cpu')}: {len(TRAINING)} training runs of {settings.train.steps:,d} steps "
        f"({train_min:.0f} min), every run together {total_min:.0f} min. The sampling mistakes use "
        f"{nums['settings']['shipped']}.\n")
    return nums


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for figures and numbers (default: book/gallery)")
    parser.add_argument("--cache", default=None, help="cache file (default: runs/gallery_<settings>.pt)")
    args = parser.parse_args(argv)
    settings = settings_for(is_quick())
    out = Path(args.out) if args.out else ROOT / "book" / "gallery"
    cache = Cache(Path(args.cache) if args.cache else ROOT / "runs" / f"gallery_{settings.name}.pt",
                  cache_key(settings))
    start = time.perf_counter()
    runs = run_all(settings, cache, log=lambda msg: print(f"[{time.perf_counter() - start:7.0f} s] {msg}",
                                                          flush=True))
    write_outputs(settings, runs, out)
    print(f"wrote {out} ({len(cache.computed)} runs computed, {len(cache.items) - len(cache.computed)} from the cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
