"""Sample quality: a Frechet distance on the features of a Fashion-MNIST classifier.

FID (Heusel et al. 2017) compares Inception-v3 features of generated and real
images. Inception needs weights from the internet and was trained on 299x299
colour photos; on 28x28 grayscale clothes its features say little. So we
measure the same distance on the penultimate features of a small CNN trained on
Fashion-MNIST itself (``bench/train_classifier.py``; weights ship in
``assets/``). The numbers are *not* comparable to published FIDs.

Every distance comes with a spread (``fd_spread``: the bootstrap over both image sets), and
the book calls two scores different only when they differ by more than twice the combined
spread (``fd_difference``). Read a score only next to its two reference points at the same sample count n
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

from . import checks
from .data import CLASSES, load_fashion_mnist

__all__ = ["FashionClassifier", "load_classifier", "classifier_features", "frechet_distance", "feature_stats",
           "fd_spread", "fashion_fd", "reference_points", "sample_quality", "SampleQuality", "fd_difference",
           "nearest_training_images", "check_images"]

WEIGHTS = Path(__file__).parent / "assets" / "fmnist_classifier.pt"
FEATURE_DIM = 64      # small so that a 64x64 covariance is well estimated from ~500 samples
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


_RETRAIN = "recreate them with `python bench/train_classifier.py`, or reinstall the package to get the shipped file"


def read_weights(path: str | Path = WEIGHTS) -> dict:
    """The state_dict at ``path``, tensors only (``weights_only=True``: no pickled code runs).
    Raises FileNotFoundError / RuntimeError, naming the file and what to do, for a missing,
    corrupt or foreign file."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"classifier weights path {path} is a folder, not a weights file; {_RETRAIN}")
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found at {path}; {_RETRAIN}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # truncated zip, not a torch file, or objects weights_only refuses
        raise RuntimeError(f"classifier weights at {path} are not a readable state_dict ({checks.load_failure(err)}); "
                           f"{_RETRAIN}") from err
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        what = type(state).__name__ if not isinstance(state, dict) else "a dict that is not name -> tensor"
        raise RuntimeError(f"classifier weights at {path} are unusable: expected a state_dict "
                           f"(parameter name -> tensor), found {what}; {_RETRAIN}")
    return state


@functools.lru_cache(maxsize=None)
def _load_cached(device: str, path: str) -> FashionClassifier:
    # weights may be stored as float16; BatchNorm's counter stays int64
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_weights(path).items()}
    model = FashionClassifier()
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        found = "; ".join(f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                          for label, items in (("missing", missing), ("unexpected", unexpected),
                                               ("wrong shape", wrong)) if items)
        raise RuntimeError(f"classifier weights at {path} are unusable: they do not fit FashionClassifier "
                           f"({found}); {_RETRAIN}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RuntimeError(f"classifier weights at {path} are unusable: {', '.join(bad[:3])} contain NaN or inf; "
                           f"{_RETRAIN}")
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)


def load_classifier(device: str | torch.device = "cpu", path: str | Path | None = None) -> FashionClassifier:
    """The shipped classifier in eval mode, loaded once per (device, path) and shared:
    do not train or modify the returned module."""
    return _load_cached(str(torch.device(device)), str(Path(path) if path else WEIGHTS))


def check_images(x: torch.Tensor, name: str = "samples") -> None:
    """Raise unless x is float (N, 1, 28, 28) with finite values in [-1, 1], N >= 2 (a covariance
    needs two); warn when every value is >= 0 (images scaled to [0, 1] by mistake)."""
    checks.check_images(x, name, shape=(1, 28, 28), in_range=True, min_count=2)
    if x.min().item() >= 0:   # Fashion-MNIST backgrounds are -1; an all-nonnegative batch is almost surely [0, 1]
        warnings.warn(f"all {name} are >= 0: were they scaled to [0, 1]? The metric expects [-1, 1].",
                      stacklevel=3)


@torch.inference_mode()
def classifier_features(images: torch.Tensor, model: FashionClassifier | None = None,
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
    feats, _ = classifier_features(images, device=device, batch_size=batch_size, name=name)
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
    _check_n(n, len(x), f"images in the {'train' if train else 'test'} split")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[:n]]


def _check_n(n, available: int, what: str = "samples") -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an integer number of images, got {n!r}")
    if not 2 <= n <= available:
        raise ValueError(f"n must be in [2, {available}] ({available} {what} given), got {n}")
    return n


def fd_spread(feats_a: torch.Tensor, feats_b: torch.Tensor, n_boot: int = 200, seed: int = 0) -> float:
    """Standard deviation of the Frechet distance between two feature sets (n_a, D), (n_b, D),
    by the bootstrap: both sets resampled with replacement ``n_boot`` times.

    Why the bootstrap over both sides: it needs no extra samples or trained models (seeds would
    cost a training run each, disjoint subsets would halve n and change the distance's bias),
    and it carries the sampling noise of the generated set *and* of the real reference, which
    is what makes two scores at the same n differ when the models do not. Deterministic for a seed.
    """
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2 to estimate a spread, got {n_boot}")
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_boot):
        ia = torch.randint(0, len(feats_a), (len(feats_a),), generator=g)
        ib = torch.randint(0, len(feats_b), (len(feats_b),), generator=g)
        values.append(frechet_distance(*gaussian_stats(feats_a[ia]), *gaussian_stats(feats_b[ib])))
    return torch.tensor(values, dtype=torch.float64).std().item()


def fashion_fd(samples: torch.Tensor, reference: torch.Tensor | None = None, n: int | None = None,
               seed: int = 0, device: str | torch.device = "cpu") -> float:
    """Frechet distance between classifier features of ``samples`` and real images, at n each.

    samples (N, 1, 28, 28) float in [-1, 1]; the first n are used (default n = N).
    reference: images of the same kind, first n used; default: a seeded random
    subset of n images of the real test split (its stats are cached). Both sides
    always have exactly n images, because the distance's bias depends on n.
    Returns the squared distance; :func:`sample_quality` reports it with its spread
    and the floor and ceiling at that n.
    """
    check_images(samples, "samples")
    n = _check_n(len(samples) if n is None else n, len(samples))
    mu1, s1 = feature_stats(samples[:n], device=device, name="samples")
    if reference is None:
        mu2, s2 = gaussian_stats(_reference_features(n, seed, str(torch.device(device))))
    else:
        _check_n(n, len(reference), "reference images")
        mu2, s2 = feature_stats(reference[:n], device=device, name="reference")
    return frechet_distance(mu1, s1, mu2, s2)


@functools.lru_cache(maxsize=32)
def _reference_features(n: int, seed: int, device: str) -> torch.Tensor:
    """Features (n, D) of the seeded n-image subset of the real test split."""
    return classifier_features(real_subset(n, seed), device=device, name="reference")[0]


@functools.lru_cache(maxsize=16)
def _reference_points(n: int, seed: int, device: str, n_boot: int) -> dict:
    ref = _reference_features(n, seed, device)
    real = classifier_features(real_subset(n, seed, train=True), device=device, name="real")[0]
    noise_images = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    noise = classifier_features(noise_images, device=device, name="noise")[0]
    ref_stats = gaussian_stats(ref)
    return {"n": n,
            "real": frechet_distance(*gaussian_stats(real), *ref_stats),
            "real_std": fd_spread(real, ref, n_boot, seed),
            "noise": frechet_distance(*gaussian_stats(noise), *ref_stats)}


def reference_points(n: int = DEFAULT_N, seed: int = 0, device: str | torch.device = "cpu",
                     n_boot: int = 200) -> dict:
    """Floor and ceiling for ``fashion_fd`` at sample count n (cached):
    ``real`` (± ``real_std``): n train images vs the n-image test reference (disjoint real
    sets: the best a perfect model can score at this n); ``noise``: N(0, 1) clamped to [-1, 1]."""
    _check_n(n, 10_000, "test images")
    return dict(_reference_points(n, seed, str(torch.device(device)), n_boot))


@dataclass(frozen=True)
class SampleQuality:
    fd: float                  # fashion_fd of the samples vs the test reference
    fd_std: float              # its bootstrap standard deviation (fd_spread)
    n: int                     # images on each side
    fd_real: float             # floor: real vs real at the same n
    fd_real_std: float         # the floor's own bootstrap standard deviation
    fd_noise: float            # ceiling: clamped noise vs real at the same n
    confidence: float          # mean max softmax probability of the classifier
    class_counts: tuple        # argmax predictions per class, in CLASSES order
    class_spread: float        # entropy of class_counts / log(10): 1.0 = uniform, 0 = one class

    def summary(self) -> str:
        return (f"FD {self.fd:.1f} ± {self.fd_std:.1f} at n={self.n} (real-vs-real floor "
                f"{self.fd_real:.1f} ± {self.fd_real_std:.1f}, noise {self.fd_noise:.0f}) | "
                f"confidence {self.confidence:.3f} | class spread {self.class_spread:.3f} (1 = uniform)")

    __str__ = summary

    def as_dict(self) -> dict:
        return asdict(self)


def fd_difference(a: SampleQuality, b: SampleQuality, k: float = 2.0) -> tuple[float, float, bool]:
    """(fd_a - fd_b, its spread, whether |difference| > k spreads). The spreads are combined as
    if independent, sqrt(std_a^2 + std_b^2); only scores at the same n can be compared."""
    if a.n != b.n:
        raise ValueError(f"compare Frechet distances only at equal n, got n={a.n} and n={b.n}")
    diff, spread = a.fd - b.fd, math.hypot(a.fd_std, b.fd_std)
    return diff, spread, abs(diff) > k * spread


def sample_quality(samples: torch.Tensor, n: int | None = None, seed: int = 0,
                   device: str | torch.device = "cpu", n_boot: int = 200) -> SampleQuality:
    """Every sample-quality number for samples (N, 1, 28, 28) in [-1, 1], each FD with its
    bootstrap spread, and the floor and ceiling at the same n. Uses the first n samples (default all)."""
    check_images(samples, "samples")
    n = _check_n(len(samples) if n is None else n, len(samples))
    feats, logits = classifier_features(samples[:n], device=device, name="samples")   # (n, D), (n, 10)
    ref_feats = _reference_features(n, seed, str(torch.device(device)))
    ref = reference_points(n, seed, device, n_boot)
    counts = torch.bincount(logits.argmax(1), minlength=len(CLASSES))
    p = counts.double() / n
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return SampleQuality(
        fd=frechet_distance(*gaussian_stats(feats), *gaussian_stats(ref_feats)),
        fd_std=fd_spread(feats, ref_feats, n_boot, seed), n=n,
        fd_real=ref["real"], fd_real_std=ref["real_std"], fd_noise=ref["noise"],
        confidence=F.softmax(logits, 1).amax(1).mean().item(),
        class_counts=tuple(counts.tolist()), class_spread=entropy / math.log(len(CLASSES)))


@torch.inference_mode()
def nearest_training_images(samples: torch.Tensor, train: torch.Tensor, space: str = "pixel",
                            device: str | torch.device = "cpu", chunk: int = 4096):
    """For each sample its nearest training image: (distances (N,), indices (N,)).

    ``space="pixel"``: Euclidean distance between images (N, 1, 28, 28) in [-1, 1];
    ``space="features"``: between the classifier's 64-d features (what the metric sees).
    A model that copies its training data has samples at distance ~0 from some training image;
    compare the distances with those of real held-out images to the same training set.
    """
    check_images(samples, "samples")
    check_images(train, "train")
    if space not in ("pixel", "features"):
        raise ValueError(f"space must be 'pixel' or 'features', got {space!r}")
    if space == "pixel":
        a, b = samples.flatten(1), train.flatten(1)
    else:
        a = classifier_features(samples, device=device, name="samples")[0]
        b = torch.cat([classifier_features(c, device=device, name="train")[0] for c in train.split(10_000)])
    best_d = torch.full((len(a),), float("inf"), dtype=torch.float64)
    best_i = torch.zeros(len(a), dtype=torch.long)
    for start in range(0, len(b), chunk):
        # float64: cdist's matrix-product path puts exact copies at ~0.01 in float32
        d = torch.cdist(a.double(), b[start:start + chunk].double())       # (N, chunk)
        d_min, i_min = d.min(1)
        better = d_min < best_d
        best_d[better], best_i[better] = d_min[better], i_min[better] + start
    return best_d.float(), best_i
