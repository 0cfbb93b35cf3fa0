"""Sample quality: a Frechet distance on the features of a Fashion-MNIST classifier.

FID (Heusel et al. 2017) compares Inception-v3 features of generated and real
images. Inception needs weights from the internet and was trained on 299x299
colour photos; on 28x28 grayscale clothes its features say little. So we
measure the same distance on the penultimate features of a small CNN trained on
Fashion-MNIST itself (``bench/train_classifier.py``; weights ship in
``assets/``). The numbers are *not* comparable to published FIDs.

Read a score only next to its two reference points at the same sample count n
(``reference_points``): real-vs-real (the floor: finite-sample bias, the best a
perfect model can get) and clamped Gaussian noise (the ceiling). The distance is
biased upwards for small n, so compare scores only at equal n.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import diffusion
from .data import CLASSES, load_fashion_mnist

__all__ = ["FashionClassifier", "load_classifier", "frechet_distance", "feature_stats", "fashion_fd",
           "reference_points", "sample_quality", "SampleQuality", "check_images"]

WEIGHTS = Path(__file__).parent / "assets" / "fmnist_classifier.pt"
FEATURE_DIM = 64      # small so that a 64x64 covariance is well estimated from ~500 samples
RANGE_TOL = 1e-3      # samples may overshoot [-1, 1] by float rounding, not more
DEFAULT_N = 500


class FashionClassifier(nn.Module):
    """Three conv blocks and a 64-d penultimate layer; ~257k parameters (1 MB in float32).

    Input (B, 1, 28, 28) in [-1, 1]. ``features`` -> (B, 64), ``forward`` -> logits (B, 10).
    The feature width is 64, not Inception's 2048: the distance needs a covariance
    estimate, and D(D+1)/2 = 2080 entries from 500 samples is reasonable where
    2048 dimensions would leave the covariance singular.
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = len(CLASSES)):
        super().__init__()

        def block(c_in, c_out):   # bias is redundant before BatchNorm
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.trunk = nn.Sequential(
            *block(1, 32), nn.MaxPool2d(2),        # (B, 32, 14, 14)
            *block(32, 64), nn.MaxPool2d(2),       # (B, 64, 7, 7)
            *block(64, 64), nn.Flatten(),          # (B, 3136)
            nn.Linear(64 * 7 * 7, feature_dim), nn.ReLU())   # (B, D)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) in [-1, 1] -> (B, D): what the last linear layer sees."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) in [-1, 1] -> logits (B, 10)."""
        return self.head(self.features(x))


def read_weights(path: str | Path = WEIGHTS) -> dict:
    """The state_dict at ``path``, tensors only (``weights_only=True``: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found at {path}; "
                                "recreate them with `python bench/train_classifier.py`")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(f"classifier weights at {path} are corrupt or not a state_dict ({err}); "
                           "recreate them with `python bench/train_classifier.py`") from err


@functools.lru_cache(maxsize=None)
def _load_cached(device: str, path: str) -> FashionClassifier:
    # weights may be stored as float16; BatchNorm's counter stays int64
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_weights(path).items()}
    model = FashionClassifier()
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise RuntimeError(f"classifier weights at {path} do not fit FashionClassifier: {err}") from err
    return model.to(device).eval().requires_grad_(False)


def load_classifier(device: str | torch.device = "cpu", path: str | Path | None = None) -> FashionClassifier:
    """The shipped classifier in eval mode, loaded once per (device, path) and shared:
    do not train or modify the returned module."""
    return _load_cached(str(torch.device(device)), str(Path(path) if path else WEIGHTS))


def check_images(x: torch.Tensor, name: str = "samples") -> None:
    """Raise unless x is float (N, 1, 28, 28) with finite values in [-1, 1], N >= 2."""
    if isinstance(x, torch.Tensor) and (x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28)):
        raise ValueError(f"{name} must have shape (N, 1, 28, 28), got {tuple(x.shape)}")
    diffusion.check_images(x, name)                 # a tensor, floating point
    if len(x) < 2:
        raise ValueError(f"{name}: need at least 2 images to estimate a covariance, got {len(x)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1 - RANGE_TOL or hi > 1 + RANGE_TOL:
        raise ValueError(f"{name} must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                         "clamp them (x.clamp(-1, 1)) or rescale them to [-1, 1]")
    if lo >= 0:   # Fashion-MNIST backgrounds are -1; an all-nonnegative batch is almost surely [0, 1]
        warnings.warn(f"all {name} are >= 0: were they scaled to [0, 1]? The metric expects [-1, 1].",
                      stacklevel=3)


@torch.inference_mode()
def extract(images: torch.Tensor, model: FashionClassifier | None = None,
            device: str | torch.device = "cpu", batch_size: int = 500,
            name: str = "images") -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) and logits (N, 10) of images (N, 1, 28, 28) in [-1, 1]; float32, CPU."""
    check_images(images, name)
    model = model if model is not None else load_classifier(device)
    device = next(model.parameters()).device
    feats = [model.features(b.to(device, torch.float32)) for b in images.split(batch_size)]
    feats = torch.cat(feats)                                    # (N, D)
    return feats.cpu(), model.head(feats).cpu()


def gaussian_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"features must have shape (N, D) with N >= 2, got {tuple(feats.shape)}")
    if len(feats) < feats.shape[1]:
        warnings.warn(f"only {len(feats)} samples for {feats.shape[1]} feature dimensions: the covariance "
                      "is singular and the distance strongly biased; use n >= 500", stacklevel=3)
    feats = feats.double()
    return feats.mean(0), torch.cov(feats.T)                    # torch.cov divides by N - 1


def feature_stats(images: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 500,
                  name: str = "images") -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) of the classifier features of images (N, 1, 28, 28) in [-1, 1]: (D,), (D, D), float64."""
    feats, _ = extract(images, device=device, batch_size=batch_size, name=name)
    return gaussian_stats(feats)


def _sqrtm_psd(s: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix via eigh; eigenvalues clamped at 0."""
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2)
    (Frechet 1957; Dowson & Landau 1982; the formula of FID, Heusel et al. 2017):

        d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

    mu (D,), sigma (D, D); any array-like; computed in float64. S1 S2 is not
    symmetric, so scipy's sqrtm can return complex noise. Instead use
    Tr((S1 S2)^{1/2}) = Tr((S1^{1/2} S2 S1^{1/2})^{1/2}): S1 S2 and
    S1^{1/2} S2 S1^{1/2} share eigenvalues, and the latter is symmetric PSD, so
    eigh applies and tiny negative eigenvalues from rounding are clamped to 0.
    Returns d^2 (like FID, the squared distance), clamped at 0.
    """
    mu1, mu2, s1, s2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, a, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)), ("sigma1", s1, (d, d)), ("sigma2", s2, (d, d))):
        if d < 1 or tuple(a.shape) != shape:
            raise ValueError(f"need mu (D,) and sigma (D, D) with one D; {name} has shape {tuple(a.shape)}")
    root1 = _sqrtm_psd(s1)
    eig = torch.linalg.eigvalsh(root1 @ s2 @ root1)            # symmetric PSD up to rounding
    tr_covmean = eig.clamp(min=0).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean
    return max(d2.item(), 0.0)


@functools.lru_cache(maxsize=2)
def _test_split() -> torch.Tensor:
    return load_fashion_mnist(train=False)[0]                   # (10000, 1, 28, 28)


def real_subset(n: int, seed: int = 0, train: bool = False) -> torch.Tensor:
    """n real images, a fixed seeded random subset (not the first n: those would
    depend on the file's order). Nested: the subset for n is a prefix of the one for n' > n."""
    x = _test_split() if not train else load_fashion_mnist(train=True)[0]
    if not 2 <= n <= len(x):
        raise ValueError(f"n must be in [2, {len(x)}] for the {'train' if train else 'test'} split, got {n}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[:n]]


@functools.lru_cache(maxsize=32)
def _reference_stats(n: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return feature_stats(real_subset(n, seed), device=device)


def fashion_fd(samples: torch.Tensor, reference: torch.Tensor | None = None, n: int | None = None,
               seed: int = 0, device: str | torch.device = "cpu") -> float:
    """Frechet distance between classifier features of ``samples`` and real images, at n each.

    samples (N, 1, 28, 28) float in [-1, 1]; the first n are used (default n = N).
    reference: images of the same kind, first n used; default: a seeded random
    subset of n images of the real test split (its stats are cached). Both sides
    always have exactly n images, because the distance's bias depends on n.
    Returns the squared distance; ``sample_quality`` reports it with n and the
    floor and ceiling at that n.
    """
    check_images(samples, "samples")
    n = len(samples) if n is None else n
    if n > len(samples):
        raise ValueError(f"n={n} but only {len(samples)} samples were given")
    mu1, s1 = feature_stats(samples[:n], device=device, name="samples")
    if reference is None:
        mu2, s2 = _reference_stats(n, seed, str(torch.device(device)))
    else:
        if len(reference) < n:
            raise ValueError(f"reference has {len(reference)} images, fewer than n={n}")
        mu2, s2 = feature_stats(reference[:n], device=device, name="reference")
    return frechet_distance(mu1, s1, mu2, s2)


@functools.lru_cache(maxsize=16)
def _reference_points(n: int, seed: int, device: str) -> dict:
    noise = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    return {"n": n,
            "real": fashion_fd(real_subset(n, seed, train=True), n=n, seed=seed, device=device),
            "noise": fashion_fd(noise, n=n, seed=seed, device=device)}


def reference_points(n: int = DEFAULT_N, seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """Floor and ceiling for ``fashion_fd`` at sample count n (cached):
    ``real``: n train images vs the n-image test reference (disjoint real sets);
    ``noise``: N(0, 1) clamped to [-1, 1] vs the same reference."""
    return dict(_reference_points(n, seed, str(torch.device(device))))


@dataclass(frozen=True)
class SampleQuality:
    fd: float                  # fashion_fd of the samples vs the test reference
    n: int                     # images on each side
    fd_real: float             # floor: real vs real at the same n
    fd_noise: float            # ceiling: clamped noise vs real at the same n
    confidence: float          # mean max softmax probability of the classifier
    class_counts: tuple        # argmax predictions per class, in CLASSES order
    class_spread: float        # entropy of class_counts / log(10): 1.0 = uniform, 0 = one class

    def summary(self) -> str:
        return (f"FD {self.fd:.2f} at n={self.n} (real {self.fd_real:.2f}, noise {self.fd_noise:.1f}) | "
                f"confidence {self.confidence:.3f} | class spread {self.class_spread:.3f} (1 = uniform)")

    __str__ = summary

    def as_dict(self) -> dict:
        return asdict(self)


def sample_quality(samples: torch.Tensor, n: int | None = None, seed: int = 0,
                   device: str | torch.device = "cpu") -> SampleQuality:
    """Every sample-quality number for samples (N, 1, 28, 28) in [-1, 1], with the
    floor and ceiling at the same n. Uses the first n samples (default all)."""
    check_images(samples, "samples")
    n = len(samples) if n is None else n
    if n > len(samples):
        raise ValueError(f"n={n} but only {len(samples)} samples were given")
    feats, logits = extract(samples[:n], device=device, name="samples")           # (n, D), (n, 10)
    mu2, s2 = _reference_stats(n, seed, str(torch.device(device)))
    ref = reference_points(n, seed, device)
    counts = torch.bincount(logits.argmax(1), minlength=len(CLASSES))
    p = counts.double() / n
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return SampleQuality(
        fd=frechet_distance(*gaussian_stats(feats), mu2, s2), n=n,
        fd_real=ref["real"], fd_noise=ref["noise"],
        confidence=F.softmax(logits, 1).amax(1).mean().item(),
        class_counts=tuple(counts.tolist()), class_spread=entropy / math.log(len(CLASSES)))
