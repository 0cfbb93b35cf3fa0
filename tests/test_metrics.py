"""The sample-quality metric: Frechet distance identities, sensitivity ladders, the
shipped classifier's accuracy, reference points, and input validation."""
import math

import pytest
import torch
import torch.nn.functional as F

from ddpm_tutorial import metrics
from ddpm_tutorial.data import load_fashion_mnist
from ddpm_tutorial.metrics import (WEIGHTS, check_images, fashion_fd, feature_stats,
                                   frechet_distance, load_classifier, reference_points, sample_quality)

N = 500


@pytest.fixture(scope="module")
def test_split():
    """The first 2000 real test images (N, 1, 28, 28) in [-1, 1] and their labels."""
    return load_fashion_mnist(train=False, subset=2000)


@pytest.fixture(scope="module")
def real(test_split):
    """Two disjoint sets of N real test images: samples and reference."""
    x = test_split[0]
    return x[:N], x[N:2 * N]


def gaussian_blur(x, sigma):
    """Separable Gaussian blur of (B, 1, H, W), reflecting at the edges."""
    r = math.ceil(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def random_spd(d, seed):
    a = torch.randn(d, 2 * d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / (2 * d)


# --- the distance itself -------------------------------------------------------------

def test_identical_stats_give_zero():
    mu, s = torch.randn(16, dtype=torch.float64), random_spd(16, 0)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-9)


def test_closed_form_for_commuting_covariances():
    # diagonal S: d^2 = ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    expected = 1 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected)


def test_symmetric():
    mu1, mu2 = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    s1, s2 = random_spd(8, 1), random_spd(8, 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_singular_covariance_is_fine():
    # fewer samples than dimensions: rank-deficient S, eigenvalues clamped at 0
    s = random_spd(8, 3)
    s[:, 0] = s[0, :] = 0
    assert math.isfinite(frechet_distance(torch.zeros(8), s, torch.zeros(8), random_spd(8, 4)))


def test_identical_image_sets_give_zero(real):
    assert fashion_fd(real[0], reference=real[0]) == pytest.approx(0, abs=1e-6)


# --- sensitivity: worse images, larger distance -----------------------------------------

def test_grows_with_blur(real):
    samples, ref = real
    fds = [fashion_fd(gaussian_blur(samples, s) if s else samples, reference=ref) for s in (0, 0.7, 1.2, 2.0)]
    assert fds == sorted(fds), fds
    assert fds[-1] > 5 * fds[0], fds


def test_grows_with_noise(real):
    samples, ref = real
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(samples.shape, generator=gen)
    fds = [fashion_fd((samples + s * eps).clamp(-1, 1), reference=ref) for s in (0, 0.1, 0.3, 0.6)]
    assert fds == sorted(fds), fds
    assert fds[-1] > 5 * fds[0], fds


# --- the shipped classifier -------------------------------------------------------------

def test_shipped_classifier_accuracy(test_split):
    x, y = test_split
    with torch.inference_mode():
        pred = load_classifier()(x).argmax(1)
    assert (pred == y).float().mean().item() >= 0.92


def test_weights_are_small_and_load_with_weights_only(monkeypatch):
    assert WEIGHTS.stat().st_size <= 2 * 1024 ** 2
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    metrics.read_weights(WEIGHTS)
    assert seen.get("weights_only") is True


def test_missing_and_corrupt_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        metrics.read_weights(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt"):
        load_classifier(path=bad)


def test_classifier_is_cached_and_in_eval_mode():
    model = load_classifier("cpu")
    assert model is load_classifier(torch.device("cpu"))
    assert not model.training
    x = torch.zeros(3, 1, 28, 28)
    assert model(x).shape == (3, 10) and model.features(x).shape == (3, metrics.FEATURE_DIM)


# --- reference points and the report ---------------------------------------------------

def test_noise_ceiling_far_above_real_floor():
    ref = reference_points(N)
    assert ref["n"] == N
    assert ref["noise"] > 20 * ref["real"], ref
    assert reference_points(N) == ref     # cached, deterministic


def test_sample_quality_on_real_images(real):
    q = sample_quality(real[0])
    assert q.n == N and sum(q.class_counts) == N
    assert q.fd < 3 * q.fd_real and q.fd_noise > 10 * q.fd
    assert q.confidence > 0.8 and q.class_spread > 0.95
    assert "n=500" in q.summary() and "real" in str(q) and "noise" in str(q)


def test_sample_quality_on_one_class(test_split):
    x, y = test_split
    q = sample_quality(x[y == 1][:100])     # trousers only
    assert q.class_counts[1] >= 95 and q.class_spread < 0.2


def test_feature_stats_shapes(real):
    mu, s = feature_stats(real[0][:100])
    d = metrics.FEATURE_DIM
    assert mu.shape == (d,) and s.shape == (d, d) and s.dtype == torch.float64


# --- validation ------------------------------------------------------------------------

def test_rejects_wrong_shape(real):
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        fashion_fd(real[0][:, 0])
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        check_images(torch.zeros(4, 3, 28, 28))


def test_rejects_integer_images():
    with pytest.raises(TypeError, match="float"):
        fashion_fd(torch.zeros(4, 1, 28, 28, dtype=torch.uint8))


def test_rejects_out_of_range(real):
    with pytest.raises(ValueError, match=r"\[-1, 1\].*clamp"):
        fashion_fd((real[0] + 1) * 127.5)
    fashion_fd(real[0][:100] * (1 + 1e-4), reference=real[1][:100])   # rounding overshoot is tolerated


def test_warns_on_unit_range(real):
    with pytest.warns(UserWarning, match=r"\[0, 1\]"):
        check_images((real[0][:10] + 1) / 2)


def test_rejects_too_few_samples(real):
    with pytest.raises(ValueError, match="at least 2"):
        fashion_fd(real[0][:1])
    with pytest.raises(ValueError, match="at least 2"):
        fashion_fd(real[0], n=1)
    with pytest.raises(ValueError, match="only 500 samples"):
        fashion_fd(real[0], n=600)


def test_warns_when_fewer_samples_than_features(real):
    with pytest.warns(UserWarning, match="singular"):
        fashion_fd(real[0][:10], reference=real[1][:10])


def test_rejects_mismatched_stats():
    with pytest.raises(ValueError, match=r"mu \(D,\) and sigma \(D, D\)"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
