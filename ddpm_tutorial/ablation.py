"""The skip-connection ablation of chapter 6, as functions the chapter calls.

Variants of one U-Net that differ only in what the decoder's skips carry:
``pre`` (features before downsampling: the standard U-Net), ``post`` (after
downsampling: the seed tutorial's bug), ``none`` (no skips) and ``none (widened)``
(no skips, channels widened until the parameter count matches ``pre``, so that
"more parameters wins" cannot explain a difference).

Every variant gets the same budget: steps, batch, data order and noise per seed
(the trainer seeds each step by (seed, step)), schedule, optimiser, EMA, sampler,
sample count, and the same initial noise x_T when sampling.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field

import torch

from .config import ModelConfig, TrainConfig, get_preset
from .metrics import sample_quality
from .sampling import ddim_sample
from .train import Trainer
from .unet import UNet, count_parameters


@dataclass
class AblationSettings:
    model: ModelConfig = field(default_factory=ModelConfig)   # the "pre" variant
    steps: int = 700
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.99
    seeds: tuple = (0, 1, 2)
    subset: int = 0               # training images (0 = all 60k)
    n_samples: int = 250          # samples scored per model (same for all)
    ddim_steps: int = 50

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                           warmup_steps=self.warmup_steps, lr_decay="cosine",
                           ema_decay=self.ema_decay, subset=self.subset, seed=seed)


def settings_for(preset_name: str) -> AblationSettings:
    """Budget per preset: quick (CI, about a minute), cpu (about an hour on 2 cores), gpu."""
    model = get_preset(preset_name).model
    if preset_name == "quick":
        return AblationSettings(model=model, steps=20, batch_size=16, seeds=(0,), subset=512,
                                n_samples=32, ddim_steps=10, warmup_steps=5, ema_decay=0.9)
    if preset_name == "gpu":
        return AblationSettings(model=ModelConfig(base_channels=32, channel_mults=(1, 2, 2)),
                                steps=3000, batch_size=128,
                                lr=1e-3, warmup_steps=200, ema_decay=0.995, n_samples=1000,
                                ddim_steps=100)
    # cpu: 12 runs must fit in under an hour on 2 cores, so a small U-Net (widths 16-32-32,
    # ~165k parameters) trains 400 steps per run; the skip placement is what is compared.
    # The widths are fixed here (not taken from the cpu preset) so the chapter's results stay valid.
    return AblationSettings(model=ModelConfig(base_channels=16, channel_mults=(1, 2, 2)), steps=400,
                            n_samples=200, ddim_steps=25)


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


def variant_configs(base: ModelConfig) -> dict:
    """The four variants, keyed by name."""
    pre = dataclasses.replace(base, skip="pre")
    none = dataclasses.replace(base, skip=None)
    return {"pre": pre, "post": dataclasses.replace(base, skip="post"), "none": none,
            "none (widened)": widen_to_match(none, count_parameters(UNet(pre)))}


def run_variant(name: str, cfg: ModelConfig, seed: int, settings: AblationSettings,
                data: torch.Tensor, device=None, progress: bool = False) -> dict:
    """Train one variant with one seed, sample from its EMA weights and score the samples."""
    torch.manual_seed(seed)                          # identical initialisation rule per seed
    trainer = Trainer(UNet(cfg), data, settings.train_config(seed), device=device)
    trainer.fit(progress=progress)
    model = trainer.ema.module.eval()
    start = time.perf_counter()
    samples = ddim_sample(model, trainer.schedule, n=settings.n_samples, steps=settings.ddim_steps,
                          seed=10_000 + seed, device=trainer.device, progress=False).images
    quality = sample_quality(samples)
    return {"variant": name, "seed": seed, "params": count_parameters(model),
            "loss": trainer.history.loss, "bucket_loss": trainer.history.bucket_means(),
            "fd": quality.fd, "fd_real": quality.fd_real, "fd_noise": quality.fd_noise,
            "confidence": quality.confidence, "class_spread": quality.class_spread,
            "train_seconds": trainer.history.seconds, "sample_seconds": time.perf_counter() - start,
            "samples": samples[:16], "model": model.cpu()}


def run_ablation(settings: AblationSettings, data: torch.Tensor, device=None,
                 variants: dict | None = None, progress: bool = True) -> list:
    """Every variant x every seed. Returns one result dict per run (see :func:`run_variant`)."""
    from tqdm.auto import tqdm
    variants = variants or variant_configs(settings.model)
    jobs = [(name, cfg, seed) for seed in settings.seeds for name, cfg in variants.items()]
    results = []
    for name, cfg, seed in tqdm(jobs, desc="ablation runs", disable=not progress):
        results.append(run_variant(name, cfg, seed, settings, data, device))
    return results


def summarize(results: list, last: int = 100) -> list:
    """Per variant: mean and sample std over seeds of the final loss (mean of the last
    ``last`` steps), the Frechet distance, confidence and class spread."""
    rows = []
    for name in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == name]
        final = [sum(r["loss"][-last:]) / len(r["loss"][-last:]) for r in runs]
        row = {"variant": name, "params": runs[0]["params"], "seeds": len(runs)}
        for key, values in [("final_loss", final), ("fd", [r["fd"] for r in runs]),
                            ("confidence", [r["confidence"] for r in runs]),
                            ("class_spread", [r["class_spread"] for r in runs])]:
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
            row[key], row[key + "_std"] = mean, std
        rows.append(row)
    return rows


@torch.no_grad()
def denoising_probe(models: dict, schedule, x0: torch.Tensor, ts, seed: int = 0) -> dict:
    """For fixed x_0 and each t in ``ts``: noise once with Eq. 4 (the same eps for every model)
    and return each model's hat-x_0 (Eq. 4 inverted). {name: {t: (N, 1, H, W)}}, plus "x_t"."""
    from .diffusion import predict_x0_from_eps, q_sample
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    out = {"x_t": {}}
    for t_index in ts:
        t = torch.full((x0.shape[0],), t_index, dtype=torch.long)
        xt = q_sample(schedule, x0, t, eps)
        out["x_t"][t_index] = xt
        for name, model in models.items():
            x0_hat = predict_x0_from_eps(schedule, xt, t, model.eval()(xt, t))
            out.setdefault(name, {})[t_index] = x0_hat.clamp(-1, 1)
    return out
