"""The skip-connection ablation of chapter 7, as functions the chapter calls.

Variants of one U-Net that differ only in what the decoder's skips carry:
``pre`` (features before downsampling: the standard U-Net), ``post`` (after
downsampling: the original tutorial's bug), ``none`` (no skips) and, on request,
``none (widened)`` (no skips, channels widened until the parameter count matches
``pre``, so that "more parameters wins" cannot explain a difference).

Every variant gets the same budget (the preset's ``AblationConfig``): steps, batch,
learning-rate schedule, EMA, data order and noise per seed (the trainer seeds each
step by (seed, step)), initialisation seed, sampler, sample count, and the same
initial noise x_T when sampling.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
import typing
from pathlib import Path

import torch

from .config import AblationConfig, DiffusionConfig, ModelConfig, Preset
from .metrics import sample_quality
from .sampling import ddim_sample
from .train import build_trainer
from .unet import UNet, count_parameters


def widen_to_match(cfg: ModelConfig, target_params: int, max_extra: int = 3) -> ModelConfig:
    """Widen levels by 0..max_extra multiples of ``groups`` channels each, keeping the
    time-embedding size, and return the config whose parameter count is closest to
    ``target_params`` (ties: the narrower). Only widths change."""
    g = cfg.groups
    best, best_gap = cfg, abs(count_parameters(UNet(cfg)) - target_params)
    for extra in itertools.product(range(max_extra + 1), repeat=len(cfg.widths)):
        widths = tuple(w + g * k for w, k in zip(cfg.widths, extra))
        candidate = dataclasses.replace(cfg, base_channels=g, channel_mults=tuple(w // g for w in widths),
                                        time_embed_dim=cfg.temb_dim)
        gap = abs(count_parameters(UNet(candidate)) - target_params)
        if gap < best_gap:
            best, best_gap = candidate, gap
    return best


def variant_configs(settings: AblationConfig) -> dict:
    """The model config of each variant named in ``settings.variants``, keyed by name."""
    base = settings.model
    configs = {}
    for name in settings.variants:
        if name == "none (widened)":
            pre = dataclasses.replace(base, skip="pre")
            configs[name] = widen_to_match(dataclasses.replace(base, skip="none"), count_parameters(UNet(pre)))
        else:
            configs[name] = dataclasses.replace(base, skip=name)    # ModelConfig validates the name
    return configs


def run_variant(preset: Preset, name: str, cfg: ModelConfig, seed: int, data: torch.Tensor,
                device=None, progress: bool = False) -> dict:
    """Train one variant with one seed on the preset's ablation budget, sample from its EMA
    weights (DDIM, x_T seeded by the training seed) and score the samples with their spread."""
    settings = preset.ablation
    trainer = build_trainer(preset, data, device, model=cfg, train=dataclasses.replace(settings.train, seed=seed))
    trainer.fit(progress=progress)
    model = trainer.ema.module.eval()
    start = time.perf_counter()
    samples = ddim_sample(model, trainer.schedule, n=settings.n_samples, steps=settings.ddim_steps,
                          seed=10_000 + seed, device=trainer.device, progress=False).images
    sample_seconds = time.perf_counter() - start
    quality = sample_quality(samples, n_boot=preset.n_bootstrap)
    return {"variant": name, "seed": seed, "params": count_parameters(model),
            "loss": trainer.history.loss, "bucket_loss": trainer.history.bucket_means(),
            "quality": quality.as_dict(), "train_seconds": trainer.history.seconds,
            "sample_seconds": sample_seconds, "samples": samples[:16],
            "config": dataclasses.asdict(cfg), "ema": {k: v.cpu() for k, v in model.state_dict().items()}}


def run_ablation(preset: Preset, data: torch.Tensor, device=None, cache: str | Path | None = None,
                 progress: bool = True) -> list:
    """Every variant x every seed of ``preset.ablation``: one result dict per run.

    With ``cache`` (a path under runs/), finished runs are saved there as they complete and
    reloaded on the next call when the settings are unchanged, so re-running the chapter, or
    resuming an interrupted ablation, retrains nothing it already has.
    """
    from tqdm.auto import tqdm
    from .checkpoint import load_checkpoint_dict, save_checkpoint
    settings = preset.ablation
    key = cache_key(preset)
    done = {}
    if cache and Path(cache).exists():
        stored = load_checkpoint_dict(cache)
        if _canonical(stored.get("key", {})) == key:
            done = {(r["variant"], r["seed"]): r for r in stored["results"]}
    variants = variant_configs(settings)
    jobs = [(name, cfg, seed) for seed in settings.seeds for name, cfg in variants.items()]
    results = []
    for name, cfg, seed in tqdm(jobs, desc="ablation runs", disable=not progress, mininterval=5.0):
        if (name, seed) not in done:
            done[(name, seed)] = run_variant(preset, name, cfg, seed, data, device)
            if cache:
                save_checkpoint(cache, {"key": key, "results": list(done.values())})
        results.append(done[(name, seed)])
    return results


def cache_key(preset: Preset) -> dict:
    """What a cached run depends on: the recipe, network, sampler and schedule. Not the list of
    seeds or variants, which only select runs, so adding a seed reuses every run already done.
    Fields at their default are left out (:func:`_canonical`), so a config field added in a
    later version, at its default, does not invalidate runs cached before it existed."""
    settings = dataclasses.asdict(preset.ablation)
    for selector in ("seeds", "variants"):
        settings.pop(selector)
    return _canonical({"ablation": settings, "diffusion": dataclasses.asdict(preset.diffusion)})


def cache_path(preset: Preset) -> Path:
    """Where chapter 07 and ``tools/run_ablation.py`` keep a preset's finished runs (ignored by git)."""
    return Path("runs") / f"ablation_{preset.name}.pt"


_KEY_TYPES = {"ablation": AblationConfig, "diffusion": DiffusionConfig}


def _canonical(key: dict, types: dict | None = None) -> dict:
    """A cache key (a stored one too) as plain values without the fields that equal their
    dataclass default; nested configs (``ablation.model``, ``ablation.train``) likewise."""
    types = _KEY_TYPES if types is None else types
    out = {}
    for name, value in key.items():
        cls = types.get(name)
        if isinstance(value, dict) and dataclasses.is_dataclass(cls):
            hints = typing.get_type_hints(cls)
            nested = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
            defaults = {f.name: as_stored(f.default) for f in dataclasses.fields(cls)
                        if f.default is not dataclasses.MISSING}
            value = _canonical(value, nested)
            out[name] = {k: v for k, v in value.items() if k not in defaults or v != defaults[k]}
        else:
            out[name] = as_stored(value)
    return out


def as_stored(obj):
    """Dataclass dicts as stored by torch.save(weights_only): tuples become lists."""
    if isinstance(obj, dict):
        return {k: as_stored(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_stored(v) for v in obj]
    return obj


def model_of(result: dict) -> UNet:
    """The trained EMA network of one run (from :func:`run_variant`), in eval mode on the CPU."""
    model = UNet(ModelConfig(**result["config"]))
    model.load_state_dict(result["ema"])
    return model.eval()


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for a single value)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(results: list, last: int = 100) -> list:
    """Per variant: mean and sample std over seeds of the final loss (mean of the last
    ``last`` steps), the Frechet distance, confidence and class spread; plus the mean
    bootstrap spread of one model's FD (``fd_boot``), the noise of a single score."""
    rows = []
    for name in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == name]
        row = {"variant": name, "params": runs[0]["params"], "seeds": len(runs)}
        columns = {"final_loss": [sum(r["loss"][-last:]) / len(r["loss"][-last:]) for r in runs],
                   "fd": [r["quality"]["fd"] for r in runs],
                   "confidence": [r["quality"]["confidence"] for r in runs],
                   "class_spread": [r["quality"]["class_spread"] for r in runs]}
        for key, values in columns.items():
            row[key], row[key + "_std"] = mean_std(values)
        row["fd_boot"] = mean_std([r["quality"]["fd_std"] for r in runs])[0]
        rows.append(row)
    return rows


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for x in [0, 1]."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):          # the fraction converges fast on this side
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (df > 0, not necessarily an integer):

        P(|T| > |t|) = I_{df / (df + t^2)}(df / 2, 1 / 2)
    """
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_critical(df: float, level: float = 0.95) -> float:
    """The two-sided critical value of Student's t: P(|T| <= c) = level (by bisection on the cdf).
    df = 4, level 0.95: 2.776; df -> infinity: the normal's 1.960."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    target, lo, hi = 0.5 + level / 2, 0.0, 1.0
    while student_t_cdf(hi, df) < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def welch_df(s_a: float, n_a: int, s_b: float, n_b: int) -> float:
    """The Welch-Satterthwaite degrees of freedom of a difference of two means, from the sample
    standard deviations s and counts n of each side:

        df = (s_a^2/n_a + s_b^2/n_b)^2 / ((s_a^2/n_a)^2 / (n_a - 1) + (s_b^2/n_b)^2 / (n_b - 1))

    Equal spreads and n seeds each: 2 (n - 1), 4 for three seeds; one side without spread: n - 1."""
    va, vb = s_a ** 2 / n_a, s_b ** 2 / n_b
    return (va + vb) ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1))


def compare(rows: list, a: str, b: str, key: str, level: float = 0.95) -> dict:
    """Welch's t test on the seed means of ``key`` for variants a and b (rows from :func:`summarize`).

    Returns the difference a - b, its standard error se = sqrt(s_a^2/n_a + s_b^2/n_b) from the
    seeds' spread, the Welch-Satterthwaite degrees of freedom ``df``, the two-sided critical value
    ``t_crit`` of Student's t at ``level`` for that df, and ``significant``: |diff| > t_crit * se.
    With three seeds a side df is about 4 and t_crit about 2.8, not the normal's 2: few seeds
    estimate the spread itself poorly. A single seed on either side has no spread: no claim.
    """
    by = {r["variant"]: r for r in rows}
    ra, rb = by[a], by[b]
    diff = ra[key] - rb[key]
    out = {"a": a, "b": b, "key": key, "diff": diff, "level": level,
           "se": float("nan"), "df": float("nan"), "t_crit": float("nan"), "t": float("nan"), "significant": False}
    if ra["seeds"] < 2 or rb["seeds"] < 2:
        return out
    sa, sb = ra[key + "_std"], rb[key + "_std"]
    se = math.sqrt(sa ** 2 / ra["seeds"] + sb ** 2 / rb["seeds"])
    out["se"] = se
    if se == 0:                            # identical values on both sides: any difference is exact
        out["significant"] = diff != 0
        return out
    df = welch_df(sa, ra["seeds"], sb, rb["seeds"])
    out.update(df=df, t_crit=t_critical(df, level), t=diff / se)
    out["significant"] = bool(abs(diff) > out["t_crit"] * se)
    return out


@torch.no_grad()
def loss_by_t(model, schedule, x0: torch.Tensor, ts, seed: int = 0) -> dict:
    """L_simple of a trained model at fixed timesteps, on fixed images x0 (N, 1, H, W) and one
    fixed noise draw per t: {t: mean over images}. The same x0 and noise for every model."""
    from .diffusion import loss_simple
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t_index in ts:
        eps = torch.randn(x0.shape, generator=g)
        t = torch.full((x0.shape[0],), int(t_index), dtype=torch.long)
        out[int(t_index)] = loss_simple(model.eval(), schedule, x0, t, eps).item()
    return out


@torch.no_grad()
def denoising_probe(models: dict, schedule, x0: torch.Tensor, ts, seed: int = 0) -> dict:
    """For fixed x_0 and each t in ``ts``: noise once with Eq. 4 (the same eps for every model)
    and return each model's hat-x_0 (Eq. 4 inverted). {name: {t: (N, 1, H, W)}}, plus "x_t"."""
    from .diffusion import eps_and_x0, q_sample
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    out = {"x_t": {}}
    for t_index in ts:
        t = torch.full((x0.shape[0],), t_index, dtype=torch.long)
        xt = q_sample(schedule, x0, t, eps)
        out["x_t"][t_index] = xt
        for name, model in models.items():
            _, x0_hat = eps_and_x0(schedule, xt, t, model.eval()(xt, t))
            out.setdefault(name, {})[t_index] = x0_hat.clamp(-1, 1)
    return out
