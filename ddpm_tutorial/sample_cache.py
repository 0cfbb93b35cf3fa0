"""Sets of samples kept on disk, so that an expensive set (1000 network calls per image) is made
once and reused by every chapter or script that asks for exactly the same set.

A set is named by everything that decides its pixels: the model's weights, the noise schedule,
the starting noise x_T, the sampler and its settings, and how the set is cut into seeded chunks.
Their hash is the file name under ``runs/samples/`` (ignored by git). Before a stored set is
reused, the sampler runs now on the first two starting noises and must reproduce the two images
stored with the set (a *probe*, to 1e-3): a change of the package that changes what the sampler
computes makes a new set instead of returning the old one, while a change that does not (a
comment, a refactor, another thread count) keeps it.

    x_T = torch.randn(500, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ddpm = sample_set(model, schedule, x_T, "ddpm")                 # 500 x 1000 calls, once
    ddim = sample_set(model, schedule, x_T, "ddim", steps=50, eta=1.0)
    ddpm.images, ddpm.seconds, ddpm.cached
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .runinfo import hardware_summary
from .sampling import ddpm_sample, sample

PROBE = 2                      # starting noises re-sampled to validate a stored set
PROBE_ATOL = 1e-3              # images in [-1, 1]: float rounding passes, a changed sampler does not


@dataclass
class SampleSet:
    """images: (N, C, H, W) in [-1, 1]; raw: the same before the final clamp. seconds: the wall
    clock of making the whole set, on the hardware ``made_on`` names; cached: True when it was
    read from disk instead of made now."""
    images: torch.Tensor
    raw: torch.Tensor
    seconds: float
    made_on: str
    cached: bool


def cache_dir() -> Path:
    """Where sets are kept: ``runs/samples`` (``DDPM_SAMPLE_CACHE`` overrides; ``off`` disables)."""
    return Path(os.environ.get("DDPM_SAMPLE_CACHE", Path("runs") / "samples"))


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for x in tensors:
        x = x.detach().cpu().contiguous()
        h.update(str((x.dtype, tuple(x.shape))).encode())
        h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


def set_key(model, schedule, x_T: torch.Tensor, method: str, chunk: int, options: dict) -> dict:
    """Everything that decides a set's pixels, as plain values (the model, schedule and x_T as hashes)."""
    return {"model": _digest(*model.state_dict().values()),
            "schedule": _digest(schedule.beta) + f":{schedule.prediction}",
            "x_T": _digest(x_T), "method": method, "chunk": chunk,
            "options": {k: options[k] for k in sorted(options)}}


def _file(key: dict) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir() / f"{key['method']}_{name}.pt"


def _sample(model, schedule, method: str, **kwargs):
    """One call of the package's sampler: Algorithm 2 for "ddpm", else ``sample`` with that method."""
    if method == "ddpm":
        return ddpm_sample(model, schedule, progress=False, **kwargs)
    return sample(model, schedule, method, progress=False, **kwargs)


def _sample_chunks(model, schedule, x_T: torch.Tensor, method: str, chunk: int, device, options: dict,
                   progress: bool):
    """The set itself: chunk i of ``chunk`` starting noises sampled with seed i, so the fresh
    noise of the stochastic samplers is reproducible too. Returns (images, raw)."""
    chunks = tqdm(x_T.split(chunk), desc=f"{method} {options or ''}".strip(), disable=not progress)
    parts = [_sample(model, schedule, method, n=len(x), x_T=x, seed=i, device=device, **options)
             for i, x in enumerate(chunks)]
    return torch.cat([p.images for p in parts]), torch.cat([p.raw for p in parts])


def _probe(model, schedule, x_T: torch.Tensor, method: str, device, options: dict) -> torch.Tensor:
    return _sample(model, schedule, method, n=min(PROBE, len(x_T)), x_T=x_T[:PROBE], seed=0, device=device,
                   **options).images


def sample_set(model, schedule, x_T: torch.Tensor, method: str = "ddim", *, chunk: int = 50, device=None,
               progress: bool = False, **options) -> SampleSet:
    """``len(x_T)`` samples of ``sampling.sample(model, schedule, method, **options)`` from the
    starting noises x_T (N, C, H, W), in seeded chunks of ``chunk``; read from the cache when the
    same set was made before and the probe still agrees, else made now and stored.

    ``options``: the sampler's settings (``steps``, ``eta``, ``clip_x0``, ``rederive_eps``, ...).
    A CPU keeps chunks of about 50 images in its caches and runs them about twice as fast per
    image as one batch of 500; a GPU prefers one large batch (pass ``chunk=len(x_T)``).
    ``progress``: a bar over the chunks while the set is made.
    """
    if x_T.ndim != 4:
        raise ValueError(f"x_T must be starting noises (N, C, H, W), got shape {tuple(x_T.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    device = torch.device(device or next(model.parameters()).device)
    key = set_key(model, schedule, x_T, method, chunk, options)
    use_cache = str(cache_dir()) != "off"
    path = _file(key)
    if use_cache and path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == json.loads(json.dumps(key, default=str)):
            probe = _probe(model, schedule, x_T, method, device, options).cpu()
            if torch.allclose(probe, stored["probe"], atol=PROBE_ATOL, rtol=0):
                return SampleSet(stored["images"], stored["raw"], stored["seconds"], stored["made_on"], True)
    t0 = time.perf_counter()
    images, raw = _sample_chunks(model, schedule, x_T, method, chunk, device, options, progress)
    seconds = time.perf_counter() - t0
    made_on = hardware_summary(device)
    if use_cache:
        probe = _probe(model, schedule, x_T, method, device, options).cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"key": json.loads(json.dumps(key, default=str)), "images": images.cpu(), "raw": raw.cpu(),
                    "probe": probe, "seconds": seconds, "made_on": made_on}, tmp)
        os.replace(tmp, path)                      # atomic: an interrupted run leaves no half-written set
    return SampleSet(images.cpu(), raw.cpu(), seconds, made_on, False)
