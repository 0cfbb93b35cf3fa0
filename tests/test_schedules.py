"""Noise schedules: the numbers the rest of the math stands on (Ho et al. 2020, Eq. 4 and 7).

Expected values are computed independently here, in float64 with Python's ``math``,
never by calling the code under test twice.
"""
import math

import pytest
import torch

from ddpm_tutorial.config import DiffusionConfig
from ddpm_tutorial.checks import check_timesteps
from ddpm_tutorial.schedules import NoiseSchedule, cosine_betas, extract, linear_betas, make_schedule

FIELDS = ("beta", "alpha", "alpha_bar", "alpha_bar_prev", "sqrt_alpha_bar",
          "sqrt_one_minus_alpha_bar", "beta_tilde", "posterior_mean_coef_x0",
          "posterior_mean_coef_xt")


def paper_linear_beta(i, T=1000, start=1e-4, end=0.02):
    """beta at code index i (paper step i+1) of the linear schedule."""
    return start + (end - start) * i / (T - 1)


def cosine_beta(i, T=1000, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal (2021), Eq. 17, written out with math.cos."""
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
    return min(1 - f(i + 1) / f(i), max_beta)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alpha_bar_strictly_decreasing_in_0_1(name):
    s = make_schedule(name)
    assert s.T == 1000
    assert (s.alpha_bar[1:] < s.alpha_bar[:-1]).all()
    assert 0 < s.alpha_bar.min() and s.alpha_bar.max() < 1
    assert (s.snr[1:] < s.snr[:-1]).all()


def test_pin_linear_alpha_bar():
    prod = 1.0
    for i in range(500):
        prod *= 1 - paper_linear_beta(i)
    s = make_schedule("linear")
    assert abs(s.alpha_bar[499].item() - prod) < 1e-6
    assert abs(prod - 0.0785872) < 1e-6         # the value itself, as a reader will see it
    end = prod
    for i in range(500, 1000):
        end *= 1 - paper_linear_beta(i)
    assert s.alpha_bar[999].item() == pytest.approx(end, rel=1e-5)   # ~4.04e-5: almost pure noise


def test_pin_cosine_alpha_bar():
    prod = 1.0
    for i in range(500):
        prod *= 1 - cosine_beta(i)
    # without the clip the product telescopes to f(t)/f(0)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    assert prod == pytest.approx(f(0.5) / f(0.0), rel=1e-12)
    assert abs(prod - 0.4938436) < 1e-6
    s = make_schedule("cosine")
    assert abs(s.alpha_bar[499].item() - prod) < 1e-6
    assert s.beta[-1].item() == pytest.approx(0.999)      # the clip at the singularity t = T


def test_linear_betas_endpoints_are_the_papers():
    b = linear_betas()
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert b[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert b[123].item() == pytest.approx(paper_linear_beta(123), rel=1e-12)


def test_cosine_betas_match_formula():
    b = cosine_betas(1000)
    for i in (0, 1, 250, 998, 999):
        assert b[i].item() == pytest.approx(cosine_beta(i), rel=1e-10)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_beta_tilde_and_posterior_coefficients(name):
    s = make_schedule(name)
    assert s.beta_tilde[0].item() == 0.0                     # q(x_0 | x_1, x_0) is a point mass
    assert s.alpha_bar_prev[0].item() == 1.0
    assert torch.equal(s.alpha_bar_prev[1:], s.alpha_bar[:-1])
    assert (s.beta_tilde[1:] > 0).all() and (s.beta_tilde[1:] < s.beta[1:]).all()
    # Eq. 7 at one t, by hand in float64
    betas = [paper_linear_beta(i) if name == "linear" else cosine_beta(i) for i in range(301)]
    ab_prev = math.prod(1 - b for b in betas[:300])
    ab = ab_prev * (1 - betas[300])
    assert s.beta_tilde[300].item() == pytest.approx((1 - ab_prev) / (1 - ab) * betas[300], rel=1e-5)
    assert s.posterior_mean_coef_x0[300].item() == pytest.approx(
        math.sqrt(ab_prev) * betas[300] / (1 - ab), rel=1e-5)
    assert s.posterior_mean_coef_xt[300].item() == pytest.approx(
        math.sqrt(1 - betas[300]) * (1 - ab_prev) / (1 - ab), rel=1e-5)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_buffers_are_float64_computed_float32_stored(name):
    s = make_schedule(name)
    for f in FIELDS:
        assert getattr(s, f).dtype == torch.float32, f
        assert getattr(s, f).shape == (1000,), f
    betas = linear_betas() if name == "linear" else cosine_betas(1000)
    ab64 = torch.cumprod(1 - betas, 0)
    assert torch.equal(s.alpha_bar, ab64.float())          # rounded once, at the end
    assert torch.equal(s.sqrt_one_minus_alpha_bar, (1 - ab64).sqrt().float())


def test_from_config_and_to():
    s = NoiseSchedule.from_config(DiffusionConfig(T=50, schedule="linear", beta_start=1e-3, beta_end=0.1))
    assert s.T == 50
    assert s.beta[-1].item() == pytest.approx(0.1)
    moved = s.to("cpu")
    assert moved.device.type == "cpu" and torch.equal(moved.alpha_bar, s.alpha_bar)
    c = NoiseSchedule.from_config(DiffusionConfig(T=64, schedule="cosine"))
    assert torch.equal(c.beta, make_schedule("cosine", T=64).beta)
    assert NoiseSchedule.from_config().T == 1000


def test_extract_broadcast_shape_and_values():
    a = torch.arange(10, dtype=torch.float32) * 10
    t = torch.tensor([3, 0, 9])
    out = extract(a, t, (3, 1, 28, 28))
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == [30.0, 0.0, 90.0]
    assert extract(a, t, (3, 5)).shape == (3, 1)
    x = torch.ones(3, 2, 4, 4)
    y = extract(a, t, x.shape) * x                     # broadcasts per sample
    assert torch.equal(y[1], torch.zeros(2, 4, 4)) and torch.equal(y[2], torch.full((2, 4, 4), 90.0))
    assert extract(a, t.int(), (3, 1, 2, 2)).flatten().tolist() == [30.0, 0.0, 90.0]


def test_extract_checks_only_the_batch_shape():
    a = torch.zeros(10)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\) = \(2,\), got \(2, 1\)"):
        extract(a, torch.tensor([[1], [2]]), (2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\) = \(2,\), got \(3,\)"):
        extract(a, torch.tensor([1, 2, 3]), (2, 1, 4, 4))


def test_extract_does_not_validate_or_sync(monkeypatch):
    """extract runs several times per sampling step: no check_timesteps, no value read back
    to the host (each is a device sync on CUDA). Entry points validate t once instead."""
    import ddpm_tutorial.checks as checks

    def forbidden(*args, **kwargs):
        raise AssertionError("extract validated t (check_timesteps) or read a value back to the host")

    a = torch.arange(10, dtype=torch.float32)
    t = torch.tensor([3, 0, 9])
    monkeypatch.setattr(checks, "check_timesteps", forbidden)
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "aminmax", forbidden)
    out = extract(a, t, (3, 1, 2, 2))
    monkeypatch.undo()
    assert out.flatten().tolist() == [3.0, 0.0, 9.0]


def test_extract_out_of_range_still_fails_in_the_indexing(monkeypatch):
    import ddpm_tutorial.checks as checks
    calls = []
    monkeypatch.setattr(checks, "check_timesteps", lambda *a, **k: calls.append(a))
    with pytest.raises(IndexError, match="out of bounds"):
        extract(torch.zeros(10), torch.tensor([0, 10]), (2, 1, 4, 4))
    assert calls == []


def test_check_timesteps_errors():
    with pytest.raises(TypeError, match=r"t must be a torch.Tensor of integer timesteps, got list"):
        check_timesteps([1, 2], 10)
    with pytest.raises(TypeError, match=r"t must hold integer timesteps \(torch.long\), got dtype torch.float32"):
        check_timesteps(torch.tensor([1.0, 2.0]), 10)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\), got \(2, 1\)"):
        check_timesteps(torch.tensor([[1], [2]]), 10)
    with pytest.raises(ValueError, match="t has 3 timesteps but the batch has 2 images"):
        check_timesteps(torch.tensor([1, 2, 3]), 10, batch=2)
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\).*got min 0, max 10"):
        check_timesteps(torch.tensor([0, 10]), 10)
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\).*min -1"):
        check_timesteps(torch.tensor([-1, 3]), 10)
    check_timesteps(torch.tensor([0, 9], dtype=torch.int32), 10, batch=2)     # valid: no error
    check_timesteps(torch.zeros(0, dtype=torch.long), 10)                      # an empty batch


def test_schedule_construction_errors():
    with pytest.raises(ValueError, match="unknown schedule 'sigmoid'"):
        make_schedule("sigmoid")
    with pytest.raises(ValueError, match="need 0 < beta_start <= beta_end < 1"):
        linear_betas(10, 0.02, 1e-4)
    with pytest.raises(ValueError, match="need 0 < beta_start <= beta_end < 1"):
        make_schedule("linear", T=10, beta_start=0.1, beta_end=1.0)
    with pytest.raises(ValueError, match=r"1-D tensor with every value in \(0, 1\)"):
        NoiseSchedule.from_betas(torch.tensor([0.1, 0.0, 0.2]))
    with pytest.raises(ValueError, match=r"1-D tensor"):
        NoiseSchedule.from_betas(torch.full((2, 3), 0.1))
