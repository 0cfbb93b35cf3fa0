"""The bound in bits/dim (likelihood.py) against brute force: the decoder's bins integrated
numerically and summed over all 256 values, the whole bound (Eq. 5) against a Monte Carlo
estimate of Eq. 3 over forward paths of a tiny chain, exact values for an oracle denoiser,
and the estimator with drawn t against the sum over every t."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddpm_tutorial import diffusion, likelihood as lk
from ddpm_tutorial.config import ModelConfig
from ddpm_tutorial.schedules import make_schedule

LN2 = math.log(2)


def grid_images(n: int, size: int = 2, seed: int = 0) -> torch.Tensor:
    """n images (n, 1, size, size) of random 8-bit values scaled to [-1, 1], the edges 0 and 255 included."""
    k = torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(seed))
    k.view(-1)[:2] = torch.tensor([0, 255])
    return k.float() / 127.5 - 1


class Wobbly(nn.Module):
    """An eps-prediction 'network' that is wrong in a smooth, t-dependent way, so that every term
    of the bound is non-trivial (a stand-in for a trained model; no training needed)."""

    def __init__(self, T: int, size: int = 2):
        super().__init__()
        self.config = ModelConfig(image_size=size, base_channels=8, channel_mults=(1,), groups=4)
        self.scale = nn.Parameter(torch.linspace(0.5, 0.9, T))

    def forward(self, xt, t):
        s = self.scale[t].reshape(-1, 1, 1, 1)
        return torch.tanh(s * xt) + 0.1 * xt.roll(1, dims=-1)


# --- the decoder L_0 (Ho et al. section 3.3) ------------------------------------------------

def test_decoder_probabilities_of_all_256_values_sum_to_one():
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1          # every grey level
    x0 = values.reshape(256, 1, 1, 1).float()
    for mean, var in [(0.0, 1e-4), (0.37, 5e-5), (-1.3, 1e-2), (1.8, 1e-4), (0.0, 4.0)]:
        p = torch.exp(-lk.decoder_nll(x0, torch.full_like(x0, mean), torch.tensor(var)))
        assert abs(p.sum().item() - 1) < 1e-12, (mean, var, p.sum().item())


def test_decoder_matches_numerical_integration_of_the_bin():
    # trapezoidal integral of the Gaussian density over each value's bin, open bins cut at 12 sigma
    g = torch.Generator().manual_seed(1)
    x0 = grid_images(1, size=4, seed=1)
    mean = (x0.double() + 0.01 * torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()
    var = torch.tensor(1e-4)
    mine = lk.decoder_nll(x0, mean, var).flatten()
    std = var.double().sqrt()
    k = ((x0.double() + 1) * 127.5).round().flatten()
    for k, m, nll in zip(k, mean.double().flatten(), mine):
        lo = m - 12 * std if k == 0 else (k - 0.5) / 127.5 - 1    # the bin of grey level k in [-1, 1]
        hi = m + 12 * std if k == 255 else (k + 0.5) / 127.5 - 1
        if hi <= lo:
            continue
        grid = torch.linspace(lo.item(), hi.item(), 20001, dtype=torch.float64)
        density = torch.exp(-0.5 * ((grid - m) / std) ** 2) / (std * math.sqrt(2 * math.pi))
        integral = torch.trapezoid(density, grid)
        assert abs(nll.item() + math.log(integral.item())) < 1e-6 * max(1.0, nll.item()), (k, m, nll)


def test_decoder_stays_finite_far_in_the_tails():
    # values 400 standard deviations above the mean: Phi(hi) - Phi(lo) underflows to 0 in float64,
    # the log is still right (Mills ratio: -log Phi(-z) = z^2/2 + log(z sqrt(2 pi)) - log(1 - 1/z^2 + 3/z^4) + ...)
    std = 0.005
    x0 = torch.tensor([[[[128 / 127.5 - 1, 1.0]]]])        # a middle bin and the open top bin
    mean = x0 - 2.0
    nll = lk.decoder_nll(x0, mean, torch.tensor(std ** 2, dtype=torch.float64)).flatten()
    assert torch.isfinite(nll).all()
    for k, m, got in zip((128, 255), mean.double().flatten(), nll):
        z = ((k - 0.5) / 127.5 - 1 - m.item()) / std        # the bin's lower edge, standardised
        asymptote = z ** 2 / 2 + math.log(z * math.sqrt(2 * math.pi)) - math.log1p(-1 / z ** 2 + 3 / z ** 4)
        assert abs(got.item() - asymptote) < 1e-9 * asymptote, (k, got, asymptote)


def test_decoder_refuses_values_off_the_8bit_grid():
    with pytest.raises(ValueError, match="8-bit"):
        lk.decoder_nll(torch.full((1, 1, 2, 2), 0.5), torch.zeros(1, 1, 2, 2), torch.tensor(1e-4))


# --- the variances -------------------------------------------------------------------------

def test_reverse_variances():
    s = make_schedule(T=10)
    torch.testing.assert_close(lk.reverse_variance(s, "beta"), s.beta.double())
    small = lk.reverse_variance(s, "beta_tilde")
    assert s.beta_tilde[0] == 0 and small[0] == small[1] == s.beta_tilde[1].double()
    torch.testing.assert_close(small[1:], s.beta_tilde[1:].double())
    with pytest.raises(ValueError, match="beta_tilde"):
        lk.reverse_variance(s, "learned")


# --- the whole bound against brute force ----------------------------------------------------

def log_normal(x, mean, var):
    return -0.5 * (math.log(2 * math.pi) + torch.log(var) + (x - mean) ** 2 / var)


def test_bound_equals_a_monte_carlo_estimate_of_eq_3():
    """Eq. 5 (analytic KLs, the decoder, L_T) equals Eq. 3, E_q[-log p_theta(x_{0:T}) / q(x_{1:T} | x_0)],
    estimated by sampling whole forward paths of a T = 4 chain on 2x2 images."""
    T, n_paths = 4, 200_000
    s = make_schedule(T=T, beta_start=0.05, beta_end=0.3)
    model = Wobbly(T)
    x0 = grid_images(1, seed=3)                                  # (1, 1, 2, 2)
    D = x0.numel()
    for kind in lk.VARIANCES:
        sigma2 = lk.reverse_variance(s, kind)
        g = torch.Generator().manual_seed(4)
        # forward path x_1..x_T from x_0 (Eq. 2), and log q(x_{1:T} | x_0), all in float64
        x = x0.double().expand(n_paths, -1, -1, -1)
        path, log_q = [x], torch.zeros(n_paths, dtype=torch.float64)
        for i in range(T):
            mean, var = (1 - s.beta[i].double()).sqrt() * x, s.beta[i].double()
            x = mean + var.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
            log_q += log_normal(x, mean, var).sum(dim=(1, 2, 3))
            path.append(x)
        # log p_theta(x_{0:T}): the prior, the Gaussian steps, and the discretized decoder
        log_p = log_normal(path[T], torch.tensor(0.0), torch.tensor(1.0)).sum(dim=(1, 2, 3))
        with torch.no_grad():
            for i in range(T - 1, -1, -1):                        # code index i: from x_{i+1} to x_i
                t = torch.full((n_paths,), i)
                xt = path[i + 1].float()
                mu = lk.reverse_mean(s, xt.double(), t, model(xt, t).double())
                if i > 0:
                    log_p += log_normal(path[i], mu, sigma2[i]).sum(dim=(1, 2, 3))
                else:
                    log_p -= lk.decoder_nll(x0.expand(n_paths, -1, -1, -1), mu, sigma2[0]).sum(dim=(1, 2, 3))
        ratio = log_q - log_p
        brute, brute_se = ratio.mean().item(), ratio.std().item() / math.sqrt(n_paths)

        est = lk.estimate_bound(model, s, x0.expand(4000, -1, -1, -1), variances=(kind,), seed=5)[kind]
        nats, nats_se = est.bpd * D * LN2, est.stderr * D * LN2
        assert abs(nats - brute) < 4 * math.hypot(brute_se, nats_se), (kind, nats, brute, brute_se, nats_se)
        assert max(nats_se, brute_se) < 0.01 * brute, (nats_se, brute_se, brute)   # the comparison has teeth


def test_every_t_is_the_sum_of_the_terms_and_the_prior():
    T = 6
    s = make_schedule(T=T)
    model, x0 = Wobbly(T), grid_images(3, seed=6)
    est = lk.estimate_bound(model, s, x0, seed=7, batch_size=5)          # pairs split across batches
    g = torch.Generator().manual_seed(7)
    eps = torch.randn((3 * T, *x0.shape[1:]), generator=g)
    for kind, e in est.items():
        assert e.t.shape == (3, T) and (e.t == torch.arange(T)).all() and (e.weight == 1).all()
        by_hand = torch.zeros(3, dtype=torch.float64)
        for i in range(3):
            for j in range(T):
                term = lk.bound_terms(model, s, x0[i:i + 1], torch.tensor([j]), eps[i * T + j:i * T + j + 1])[kind]
                by_hand[i] += term.item()
        by_hand += lk.prior_kl(s, x0)
        torch.testing.assert_close(e.per_image, by_hand / (x0[0].numel() * LN2))


def test_oracle_denoiser_has_exact_terms(oracle):
    """With eps_theta the true noise of the one image, mu_theta = tilde-mu_t: with sigma_t^2 = tilde-beta_t
    every L_{t-1} is 0; with beta_t it is D/2 (log(beta/tilde-beta) + tilde-beta/beta - 1)."""
    T = 20
    s = make_schedule(T=T)
    x0 = grid_images(1, size=4, seed=8)
    model = oracle(s, x0)
    est = lk.estimate_bound(model, s, x0.expand(2, -1, -1, -1), seed=9)
    D = x0.numel()
    b, bt = s.beta[1:].double(), s.beta_tilde[1:].double()
    torch.testing.assert_close(est["beta_tilde"].terms[:, 1:], torch.zeros(2, T - 1, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    expected = D / 2 * (torch.log(b / bt) + bt / b - 1)
    torch.testing.assert_close(est["beta"].terms[:, 1:], expected.expand(2, -1), rtol=1e-4, atol=1e-6)


def test_prior_term_is_eq_4_at_T_against_n01():
    s = make_schedule(T=50, beta_end=0.05)
    x0 = grid_images(2, seed=10)
    ab = s.alpha_bar[-1].double()
    m, v = ab.sqrt() * x0.double(), 1 - ab
    expected = (0.5 * (-torch.log(v) + v + m ** 2 - 1)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(lk.prior_kl(s, x0), expected)


# --- drawing t ------------------------------------------------------------------------------

def test_drawn_t_weights_are_unbiased_for_the_sum():
    # for any per-t value f, E[sum_k weight_k f(t_k)] = sum_t f(t): check on 200k draws
    T, n = 50, 200_000
    f = torch.rand(T, generator=torch.Generator().manual_seed(11), dtype=torch.float64) ** 4
    t, w = lk.draw_timesteps(n, T, t_draws=3, t_exact=5, generator=torch.Generator().manual_seed(12))
    assert t.shape == w.shape == (n, 8) and (t[:, :5] == torch.arange(5)).all() and (t[:, 5:] >= 5).all()
    est = (w * f[t]).sum(dim=1)
    assert abs(est.mean().item() - f.sum().item()) < 4 * est.std().item() / math.sqrt(n)
    t, w = lk.draw_timesteps(4, T, None)
    assert (w * f[t]).sum(dim=1).allclose(f.sum().expand(4))


def test_estimator_with_drawn_t_agrees_with_every_t():
    T = 40
    s = make_schedule(T=T, beta_end=0.2)
    model, x0 = Wobbly(T), grid_images(300, seed=13)
    full = lk.estimate_bound(model, s, x0, seed=14)
    drawn = lk.estimate_bound(model, s, x0, t_draws=4, t_exact=3, seed=15)
    for kind in lk.VARIANCES:
        a, b = full[kind], drawn[kind]
        assert b.network_calls == 300 * 7 and a.network_calls == 300 * T
        gap = abs(a.bpd - b.bpd)
        assert gap < 4 * math.hypot(a.stderr, b.stderr), (kind, a.bpd, b.bpd, a.stderr, b.stderr)
    diff, se = lk.paired_difference(full["beta"], full["beta_tilde"])
    assert se > 0 and math.isfinite(diff)
    with pytest.raises(ValueError, match="same images"):
        lk.paired_difference(full["beta"], drawn["beta"])


def test_bad_arguments_are_refused():
    s = make_schedule(T=10)
    model, x0 = Wobbly(10), grid_images(2)
    with pytest.raises(ValueError, match="t_draws"):
        lk.estimate_bound(model, s, x0, t_draws=0)
    with pytest.raises(ValueError, match="t_exact"):
        lk.estimate_bound(model, s, x0, t_draws=2, t_exact=10)
    with pytest.raises(ValueError, match="8-bit"):
        lk.estimate_bound(model, s, x0 * 0.999)
    with pytest.raises(ValueError, match="beta_tilde"):
        lk.estimate_bound(model, s, x0, variances=("sigma",))


def test_kl_terms_are_eq_12_with_the_package_bound_weight():
    """For t >= 2, L_{t-1} = C_t + w_t ||eps - eps_theta||^2 (Eq. 12, summed over the values), with w_t from
    diffusion.bound_weight at the same sigma_t^2 and C_t the KL between the two variances alone."""
    T = 30
    s = make_schedule(T=T, beta_end=0.1)
    model, x0 = Wobbly(T), grid_images(6, size=4, seed=16)
    t = torch.arange(1, 7) * 4                                  # code indices >= 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(17))
    terms = lk.bound_terms(model, s, x0, t, eps)
    with torch.no_grad():
        err = (eps - model(diffusion.q_sample(s, x0, t, eps), t)).double().square().sum(dim=(1, 2, 3))
    bt = s.beta_tilde.double()[t]
    for kind in lk.VARIANCES:
        sigma2 = lk.reverse_variance(s, kind)
        C = x0[0].numel() / 2 * (torch.log(sigma2[t] / bt) + bt / sigma2[t] - 1)
        w = diffusion.bound_weight(s, sigma2)[t]
        torch.testing.assert_close(terms[kind], C + w * err, rtol=1e-4, atol=1e-6)
