"""The sample-quality metric: Frechet distance identities, sensitivity ladders, the
shipped classifier's accuracy, reference points, and input validation."""
import math

import pytest
import torch
import torch.nn.functional as F

from ddpm_tutorial import metrics
from ddpm_tutorial.data import load_fashion_mnist
from ddpm_tutorial.metrics import (WEIGHTS, SampleQuality, check_images, classifier_features, fashion_fd,
                                   fd_difference, fd_spread, feature_stats, frechet_distance, load_classifier,
                                   nearest_training_images, reference_points, sample_quality)

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
    q = sample_quality(real[0], n_boot=50)
    assert q.n == N and sum(q.class_counts) == N
    assert q.fd < 3 * q.fd_real and q.fd_noise > 10 * q.fd
    assert q.confidence > 0.8 and q.class_spread > 0.95
    # held-out real images are indistinguishable from the floor within the spreads
    assert abs(q.fd - q.fd_real) < 3 * math.hypot(q.fd_std, q.fd_real_std)
    assert 0 < q.fd_std < q.fd and 0 < q.fd_real_std < q.fd_real
    assert q.summary().startswith(f"FD {q.fd:.1f} ± {q.fd_std:.1f} at n=500 (real-vs-real floor "
                                  f"{q.fd_real:.1f} ± {q.fd_real_std:.1f}, noise {q.fd_noise:.0f})")
    assert str(q) == q.summary() and q.as_dict()["fd_std"] == q.fd_std


def test_sample_quality_on_one_class(test_split):
    x, y = test_split
    q = sample_quality(x[y == 1][:100], n_boot=20)     # trousers only
    assert q.class_counts[1] >= 95 and q.class_spread < 0.2


def test_classifier_features_are_the_penultimate_layer(real):
    feats, logits = classifier_features(real[0][:50])
    model = load_classifier()
    with torch.inference_mode():
        torch.testing.assert_close(feats, model.features(real[0][:50]))
        torch.testing.assert_close(logits, model(real[0][:50]))
    assert feats.shape == (50, metrics.FEATURE_DIM) and logits.shape == (50, 10)
    assert not hasattr(metrics, "extract")                  # one meaning per name: schedules.extract gathers


def test_feature_stats_shapes(real):
    mu, s = feature_stats(real[0][:100])
    d = metrics.FEATURE_DIM
    assert mu.shape == (d,) and s.shape == (d, d) and s.dtype == torch.float64


# --- validation ------------------------------------------------------------------------

def test_rejects_wrong_shape(real):
    with pytest.raises(ValueError, match=r"samples must have shape \(B, 1, 28, 28\), got \(500, 28, 28\)"):
        fashion_fd(real[0][:, 0])
    with pytest.raises(ValueError, match=r"samples must have shape \(B, 1, 28, 28\), got \(4, 3, 28, 28\)"):
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
    with pytest.raises(ValueError, match="need at least 2 images, got 1"):
        fashion_fd(real[0][:1])


@pytest.mark.parametrize("n, error, message", [
    (0, ValueError, r"n must be in \[2, 500\] \(500 samples given\), got 0"),
    (1, ValueError, r"n must be in \[2, 500\] \(500 samples given\), got 1"),
    (600, ValueError, r"n must be in \[2, 500\] \(500 samples given\), got 600"),
    (10.0, TypeError, r"n must be an integer number of images, got 10.0"),
    ("10", TypeError, r"n must be an integer number of images, got '10'"),
    (True, TypeError, r"n must be an integer number of images, got True"),
])
def test_bad_n_values_are_refused_clearly(real, n, error, message):
    with pytest.raises(error, match=message):
        fashion_fd(real[0], n=n)
    with pytest.raises(error, match=message):
        sample_quality(real[0], n=n)


def test_bad_n_for_the_reference_points():
    with pytest.raises(ValueError, match=r"n must be in \[2, 10000\] \(10000 test images given\), got 10001"):
        reference_points(10_001)
    with pytest.raises(ValueError, match=r"got 1$"):
        reference_points(1)
    with pytest.raises(TypeError, match="integer number of images"):
        reference_points(500.0)
    with pytest.raises(ValueError, match=r"\[2, 500\] \(500 reference images given\), got 501"):
        fashion_fd(torch.zeros(600, 1, 28, 28) - 1, reference=torch.zeros(500, 1, 28, 28) - 1, n=501)


def test_warns_when_fewer_samples_than_features(real):
    with pytest.warns(UserWarning, match="singular"):
        fashion_fd(real[0][:10], reference=real[1][:10])


def test_rejects_mismatched_stats():
    with pytest.raises(ValueError, match=r"mu \(D,\) and sigma \(D, D\)"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


# --- spreads ---------------------------------------------------------------------------------

def _gaussian_features(n, d=8, seed=0, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


def test_fd_spread_is_deterministic_for_a_seed():
    a, b = _gaussian_features(200, seed=1), _gaussian_features(200, seed=2)
    s0 = fd_spread(a, b, n_boot=30, seed=0)
    assert s0 == fd_spread(a, b, n_boot=30, seed=0)
    assert s0 != fd_spread(a, b, n_boot=30, seed=1)
    assert s0 > 0


def test_fd_spread_shrinks_as_n_grows():
    """Synthetic features: two independent N(0, I) sets (8-d), n = 100 and 1000 each."""
    small = fd_spread(_gaussian_features(100, seed=1), _gaussian_features(100, seed=2), n_boot=50)
    large = fd_spread(_gaussian_features(1000, seed=1), _gaussian_features(1000, seed=2), n_boot=50)
    assert large < small / 3, (small, large)


def test_fd_spread_is_the_bootstrap_standard_deviation():
    """Recomputed by hand: the same resampling stream, then the sample standard deviation."""
    a, b = _gaussian_features(60, seed=3), _gaussian_features(80, seed=4, shift=0.5)
    g = torch.Generator().manual_seed(7)
    values = []
    for _ in range(12):
        ia = torch.randint(0, 60, (60,), generator=g)
        ib = torch.randint(0, 80, (80,), generator=g)
        values.append(frechet_distance(a[ia].double().mean(0), torch.cov(a[ia].double().T),
                                       b[ib].double().mean(0), torch.cov(b[ib].double().T)))
    mean = sum(values) / 12
    expected = math.sqrt(sum((v - mean) ** 2 for v in values) / 11)
    assert fd_spread(a, b, n_boot=12, seed=7) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="n_boot must be >= 2 to estimate a spread, got 1"):
        fd_spread(a, b, n_boot=1)


@pytest.mark.slow
def test_real_floor_spread_shrinks_as_n_grows():
    small = reference_points(100, n_boot=40)
    large = reference_points(1000, n_boot=40)
    assert large["real_std"] < small["real_std"] / 2, (small, large)
    assert large["real"] < small["real"]                     # the distance's bias falls with n too
    assert reference_points(100, n_boot=40) == small         # deterministic (and cached)


def _quality(fd, fd_std, n=500):
    return SampleQuality(fd=fd, fd_std=fd_std, n=n, fd_real=30.0, fd_real_std=2.0, fd_noise=900.0,
                         confidence=0.9, class_counts=(50,) * 10, class_spread=1.0)


def test_fd_difference():
    diff, spread, significant = fd_difference(_quality(110.0, 3.0), _quality(100.0, 4.0))
    assert diff == pytest.approx(10.0) and spread == pytest.approx(5.0) and significant is False  # 10 = 2 spreads
    assert fd_difference(_quality(110.1, 3.0), _quality(100.0, 4.0))[2] is True
    assert fd_difference(_quality(110.1, 3.0), _quality(100.0, 4.0), k=3.0)[2] is False
    assert fd_difference(_quality(90.0, 3.0), _quality(100.0, 1.0))[0] == pytest.approx(-10.0)
    with pytest.raises(ValueError, match="compare Frechet distances only at equal n, got n=500 and n=64"):
        fd_difference(_quality(100.0, 3.0), _quality(100.0, 3.0, n=64))


# --- is it copying? ----------------------------------------------------------------------------

@pytest.mark.parametrize("space", ["pixel", "features"])
def test_nearest_training_images_finds_exact_copies(test_split, space):
    train = test_split[0][:1500]
    copies = [3, 17, 250, 999, 1234, 1499]
    held_out = test_split[0][1500:1510]
    samples = torch.cat([held_out, train[copies]])
    d, i = nearest_training_images(samples, train, space=space, chunk=256)   # several chunks
    assert d.shape == i.shape == (16,)
    assert i[10:].tolist() == copies
    assert bool((d[10:] < 1e-4).all()), f"exact copies must be at distance 0, got {d[10:].tolist()}"
    assert (d[:10] > 100 * d[10:].max()).all()             # held-out images are not copies
    # the nearest neighbour by brute force, independently of the chunking
    a = samples.flatten(1) if space == "pixel" else classifier_features(samples)[0]
    b = train.flatten(1) if space == "pixel" else classifier_features(train)[0]
    brute = ((a[:10, None].double() - b[None].double()) ** 2).sum(-1).sqrt()
    assert i[:10].tolist() == brute.argmin(1).tolist()
    torch.testing.assert_close(d[:10].double(), brute.min(1).values, atol=1e-3, rtol=1e-4)


def test_nearest_training_images_errors(real):
    with pytest.raises(ValueError, match="space must be 'pixel' or 'features', got 'latent'"):
        nearest_training_images(real[0][:4], real[1][:10], space="latent")
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        nearest_training_images(real[0][:4, :, :14], real[1][:10])
