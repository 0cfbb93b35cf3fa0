"""Identities of the DDPM math (Ho et al. 2020, Eqs. 2, 4, 6-7, 11, 14, Algorithm 2)."""
import math

import pytest
import torch

from ddpm_tutorial.checks import RANGE_TOL, check_images
from ddpm_tutorial.diffusion import (eps_posterior_mean, loss_simple, loss_weight, p_sample, predict_x0_from_eps,
                                     q_posterior, q_sample, q_step)
from ddpm_tutorial.schedules import make_schedule

SCHEDULE = make_schedule("linear")           # the paper's: T = 1000, 1e-4 .. 0.02


def _batch(B=6, seed=0, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((B, *shape), generator=g) * 2 - 1
    eps = torch.randn((B, *shape), generator=g)
    return x0, eps


@pytest.mark.parametrize("name, T", [("linear", 1000), ("cosine", 250)])
def test_closed_form_matches_iterated_chain(name, T):
    """q(x_t|x_0) of Eq. 4 vs iterating q(x_t|x_{t-1}) of Eq. 2 from one fixed x_0, N times.

    The chain's per-pixel sample mean and pooled variance must match the closed form's
    mean sqrt(bar-alpha_t) x_0 and variance 1 - bar-alpha_t within 5 standard errors."""
    s = make_schedule(name, T=T)
    N, checks = 2000, (0, T // 100 - 1, T // 10 - 1, T // 2 - 1, T - 1)
    x0 = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    g = torch.Generator().manual_seed(1)
    x = x0.expand(N, 1, 4, 4).clone()
    for t_index in range(max(checks) + 1):
        t = torch.full((N,), t_index)
        x = q_step(s, x, t, torch.randn(x.shape, generator=g))
        if t_index not in checks:
            continue
        # the closed form's parameters, read off q_sample itself
        mean = q_sample(s, x0, t[:1], torch.zeros_like(x0))                       # (1, 1, 4, 4)
        var = q_sample(s, torch.zeros_like(x0), t[:1], torch.ones_like(x0))[0, 0, 0, 0] ** 2
        se_mean = (var / N).sqrt()
        assert ((x.mean(0, keepdim=True) - mean).abs() < 5 * se_mean).all(), t_index
        resid = x - mean
        emp_var = resid.pow(2).mean()                          # pooled over 16 pixels
        se_var = var * math.sqrt(2 / (16 * N))
        assert abs(emp_var - var) < 5 * se_var, (t_index, emp_var.item(), var.item())


def test_eps_form_mean_equals_posterior_mean():
    """Eq. 11 with the true eps equals tilde-mu_t of Eq. 7 with the true x_0."""
    x0, eps = _batch()
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    xt = q_sample(SCHEDULE, x0, t, eps)
    mean7, var7 = q_posterior(SCHEDULE, x0, xt, t)
    mean11 = eps_posterior_mean(SCHEDULE, xt, t, eps)
    torch.testing.assert_close(mean11, mean7, atol=2e-5, rtol=1e-5)
    assert var7.shape == (6, 1, 1, 1)
    torch.testing.assert_close(var7.flatten(), SCHEDULE.beta_tilde[t])
    torch.testing.assert_close(mean7[0], x0[0], atol=1e-5, rtol=0)     # t = 1: the mean is x_0 itself
    # and it really depends on eps: a wrong noise gives a different mean
    assert (eps_posterior_mean(SCHEDULE, xt, t, eps + 0.1) - mean7).abs().amin(dim=(1, 2, 3)).gt(1e-4).all()


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_predict_x0_inverts_q_sample(name):
    s = make_schedule(name)
    x0, eps = _batch()
    t = torch.tensor([0, 1, 100, 500, 900, 990])
    x0_hat = predict_x0_from_eps(s, q_sample(s, x0, t, eps), t, eps)
    # float32 rounding of x_t is amplified by 1/sqrt(bar-alpha_t) at large t
    tol = 4e-6 / s.sqrt_alpha_bar[t].reshape(-1, 1, 1, 1)
    assert ((x0_hat - x0).abs() <= tol).all()


def test_q_sample_values_by_hand():
    x0 = torch.full((1, 1, 2, 2), 0.5)
    eps = torch.full((1, 1, 2, 2), -1.0)
    ab = 1.0
    for i in range(250):
        ab *= 1 - (1e-4 + (0.02 - 1e-4) * i / 999)
    xt = q_sample(SCHEDULE, x0, torch.tensor([249]), eps)
    expected = math.sqrt(ab) * 0.5 - math.sqrt(1 - ab)
    assert torch.allclose(xt, torch.full_like(xt, expected), atol=1e-6)


def test_loss_simple(oracle):
    x0, eps = _batch(B=4)
    t = torch.tensor([0, 10, 500, 999])
    loss = loss_simple(oracle(SCHEDULE, x0), SCHEDULE, x0, t, eps)
    assert loss.ndim == 0 and loss.item() < 1e-6                    # the perfect denoiser
    zero = lambda xt, t: torch.zeros_like(xt)
    per = loss_simple(zero, SCHEDULE, x0, t, eps, reduction="none")
    assert per.shape == (4,)
    torch.testing.assert_close(per, eps.pow(2).mean(dim=(1, 2, 3)))
    # t and eps drawn from the generator when not given: reproducible
    a = loss_simple(zero, SCHEDULE, x0, generator=torch.Generator().manual_seed(3))
    b = loss_simple(zero, SCHEDULE, x0, generator=torch.Generator().manual_seed(3))
    c = loss_simple(zero, SCHEDULE, x0, generator=torch.Generator().manual_seed(4))
    assert a.item() == b.item() != c.item()
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none', got 'sum'"):
        loss_simple(zero, SCHEDULE, x0, t, eps, reduction="sum")


def test_p_sample_is_mean_plus_sigma_z_and_noise_free_at_t0():
    x0, eps = _batch(B=3)
    t = torch.tensor([0, 1, 700])
    xt = q_sample(SCHEDULE, x0, t, eps)
    eps_theta = eps + 0.05 * torch.randn(eps.shape, generator=torch.Generator().manual_seed(9))
    z1, z2 = torch.randn_like(xt), torch.randn_like(xt)
    a, x0_hat = p_sample(SCHEDULE, xt, t, eps_theta, z1)
    b, _ = p_sample(SCHEDULE, xt, t, eps_theta, z2)
    mean = eps_posterior_mean(SCHEDULE, xt, t, eps_theta)
    assert torch.equal(a[0], b[0])                                   # index 0 (paper t=1): z is ignored
    torch.testing.assert_close(a[0], mean[0])
    sigma = SCHEDULE.beta[t[1:]].sqrt().reshape(-1, 1, 1, 1)        # sigma_t^2 = beta_t, the paper's choice
    torch.testing.assert_close(a[1:], mean[1:] + sigma * z1[1:])
    torch.testing.assert_close(x0_hat, predict_x0_from_eps(SCHEDULE, xt, t, eps_theta))
    c, _ = p_sample(SCHEDULE, xt, t, eps_theta)                      # z drawn when not given
    assert c.shape == xt.shape and not torch.equal(c[1:], a[1:])


def test_p_sample_clip_x0():
    x0, eps = _batch(B=2)
    t = torch.tensor([5, 999])
    xt = q_sample(SCHEDULE, x0, t, eps)
    z = torch.zeros_like(xt)
    _, unclipped = p_sample(SCHEDULE, xt, t, 0.5 * eps, z)
    assert unclipped[1].abs().max() > 1                              # so the clip has work to do
    mean_c, x0_c = p_sample(SCHEDULE, xt, t, 0.5 * eps, z, clip_x0=True)
    assert x0_c.min() >= -1 and x0_c.max() <= 1
    torch.testing.assert_close(mean_c, q_posterior(SCHEDULE, x0_c, xt, t)[0])
    # when hat-x_0 already lies in [-1, 1], clipping changes nothing: Eq. 7 == Eq. 11
    mean_true, _ = p_sample(SCHEDULE, xt, t, eps, z, clip_x0=True)
    torch.testing.assert_close(mean_true, p_sample(SCHEDULE, xt, t, eps, z)[0], atol=2e-5, rtol=1e-5)


def test_bad_inputs():
    x0, eps = _batch(B=3)
    t = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"x0 must have shape \(B, C, H, W\), got \(1, 8, 8\)"):
        q_sample(SCHEDULE, x0[0], t[:1], eps[0])
    with pytest.raises(TypeError, match="floating-point tensor scaled to"):
        q_sample(SCHEDULE, (x0 * 127).to(torch.uint8), t, eps)
    with pytest.raises(TypeError, match="x0 must be a torch.Tensor"):
        q_sample(SCHEDULE, x0.numpy(), t, eps)
    with pytest.raises(ValueError, match=r"x0 and eps must have the same shape, got \(3, 1, 8, 8\) and \(2, 1, 8, 8\)"):
        q_sample(SCHEDULE, x0, t, eps[:2])
    with pytest.raises(ValueError, match="2 timesteps but the batch has 3"):
        q_sample(SCHEDULE, x0, t[:2], eps)
    with pytest.raises(TypeError, match="integer timesteps"):
        q_sample(SCHEDULE, x0, t.float(), eps)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        q_sample(SCHEDULE, x0, torch.tensor([1, 2, 1000]), eps)
    with pytest.raises(ValueError, match="xt and z must have the same shape"):
        p_sample(SCHEDULE, x0, t, eps, z=eps[:, :, :4])
    with pytest.raises(ValueError, match="xt and output must have the same shape"):
        p_sample(SCHEDULE, x0, t, eps[:1])
    with pytest.raises(ValueError, match="x_prev and eps must have the same shape"):
        q_step(SCHEDULE, x0, t, eps[:1])


def test_check_images_is_the_one_image_check():
    """One check_images for the math, the trainer and the metric: each option refuses what it names."""
    from ddpm_tutorial import metrics, train
    assert train.check_images is check_images
    x = torch.zeros(3, 1, 8, 8)
    check_images(x, "x", shape=(1, 8, 8), in_range=True, min_count=3)          # passes
    with pytest.raises(ValueError, match=r"images must have shape \(B, 1, 4, 4\), got \(3, 1, 8, 8\)"):
        check_images(x, "images", shape=(1, 4, 4))
    with pytest.raises(ValueError, match="images: need at least 4 images, got 3"):
        check_images(x, "images", min_count=4)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[1, 0, 2, 2] = bad
        with pytest.raises(ValueError, match="images contain NaN or inf"):
            check_images(y, "images", in_range=True)
        check_images(y, "images")                        # range not asked for: not looked at
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\], got values in \[-1, 1.5\]; clamp"):
        check_images(torch.cat([x - 1, x + 1.5]), "images", in_range=True)
    check_images(x + 1 + 0.5 * RANGE_TOL, "images", in_range=True)              # float rounding is fine
    # the metric's check is this one, with the metric's shape and count
    with pytest.raises(ValueError, match=r"samples must have shape \(B, 1, 28, 28\)"):
        metrics.check_images(x)


def test_loss_weights():
    """simple: every w_t = 1 (L_simple). min_snr (Hang et al. 2023): w_t = min(SNR_t, gamma) / SNR_t,
    1 wherever SNR_t <= gamma (large t), gamma / SNR_t at the clean end, never above 1."""
    assert torch.equal(loss_weight(SCHEDULE, "simple"), torch.ones(1000))
    w, snr = loss_weight(SCHEDULE, "min_snr", gamma=5.0), SCHEDULE.snr
    assert torch.equal(w[snr <= 5], torch.ones(int((snr <= 5).sum())))
    torch.testing.assert_close(w[0], (5 / snr[0]).float())
    assert w[0] < 1e-3 and (w <= 1).all() and 0 < (snr > 5).sum() < 1000
    with pytest.raises(ValueError, match="simple"):
        loss_weight(SCHEDULE, "p2")
