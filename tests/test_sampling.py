"""Sampling: determinism, recorded trajectories, the DDIM / DPM-Solver++(2M) sub-sequences and
step functions, partial-noise starts, slerp, and the loops' math checked with oracle denoisers
(the one that knows the data point, and the exact one for Gaussian data)."""
import math

import pytest
import torch

from conftest import TINY
from ddpm_tutorial.diffusion import p_sample, predict_x0_from_eps, q_posterior, q_sample
from ddpm_tutorial.sampling import (SOLVERS, SampleResult, check_samples, ddim_sample, ddim_step, ddim_timesteps,
                                    ddpm_sample, dpm_solver_sample, dpmpp_2m_step, sample, slerp)
from ddpm_tutorial.schedules import linear_betas, make_schedule
from ddpm_tutorial.unet import UNet

# a short schedule whose alpha_bar still ends near 0 (beta_end larger than the paper's, for T = 20)
SCHEDULE = make_schedule("linear", T=20, beta_start=1e-3, beta_end=0.3)
CFG = TINY


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet(CFG, T=SCHEDULE.T).eval()


class Spy(torch.nn.Module):
    """Wraps a model and records the timesteps of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.calls = inner, inner.config, []

    def forward(self, x, t):
        self.calls.append(t.clone())
        return self.inner(x, t)


def test_schedule_is_valid():
    assert SCHEDULE.T == 20 and SCHEDULE.alpha_bar[-1] < 0.05


def test_ddpm_same_seed_same_samples(model):
    a = ddpm_sample(model, SCHEDULE, n=3, seed=1, progress=False).images
    b = ddpm_sample(model, SCHEDULE, n=3, seed=1, progress=False).images
    c = ddpm_sample(model, SCHEDULE, n=3, seed=2, progress=False).images
    assert a.shape == (3, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    g = ddpm_sample(model, SCHEDULE, n=3, progress=False, generator=torch.Generator().manual_seed(1)).images
    assert torch.equal(a, g)


@pytest.mark.parametrize("method, eta", [("ddim", 0.0), ("ddim", 1.0), ("dpm++2m", 0.0)])
def test_same_seed_same_samples(model, method, eta):
    a = sample(model, SCHEDULE, method, n=3, steps=5, eta=eta, seed=1, progress=False).images
    b = sample(model, SCHEDULE, method, n=3, steps=5, eta=eta, seed=1, progress=False).images
    c = sample(model, SCHEDULE, method, n=3, steps=5, eta=eta, seed=2, progress=False).images
    assert a.shape == (3, 1, 8, 8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_named_samplers_are_the_one_loop(model):
    kw = dict(n=2, steps=4, seed=3, progress=False)
    assert torch.equal(ddim_sample(model, SCHEDULE, eta=0.5, **kw).images,
                       sample(model, SCHEDULE, "ddim", eta=0.5, **kw).images)
    assert torch.equal(dpm_solver_sample(model, SCHEDULE, **kw).images,
                       sample(model, SCHEDULE, "dpm++2m", **kw).images)
    assert torch.equal(ddpm_sample(model, SCHEDULE, n=2, seed=3, progress=False).images,
                       sample(model, SCHEDULE, "ddpm", n=2, seed=3, progress=False).images)
    assert SOLVERS == ("ddpm", "ddim", "dpm++2m")


def _previous_ddpm_loop(model, schedule, n, seed, clip_x0=False):
    """The DDPM loop as it was before it joined ``sample`` (git 573f600, ``ddpm_sample``): Algorithm 2
    with one CPU noise draw per step, copied to the device at that step."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, cfg.in_channels, cfg.image_size, cfg.image_size), generator=g)
    with torch.no_grad():
        for t_index in range(schedule.T - 1, -1, -1):
            t = torch.full((n,), t_index, dtype=torch.long)
            eps_theta = model(x, t).float()
            z = torch.randn(x.shape, generator=g) if t_index > 0 else torch.zeros_like(x)
            x, _ = p_sample(schedule, x, t, eps_theta, z, clip_x0=clip_x0)
    return x


@pytest.mark.parametrize("clip_x0", [False, True])
def test_ddpm_samples_are_those_of_the_previous_loop_bit_for_bit(model, clip_x0):
    """The same seed gives the same DDPM samples as before the loops were joined (the noise of
    several steps is now drawn ahead, the same draws in the same order)."""
    out = ddpm_sample(model, SCHEDULE, n=3, seed=11, clip_x0=clip_x0, progress=False)
    assert torch.equal(out.raw, _previous_ddpm_loop(model, SCHEDULE, 3, 11, clip_x0))


def test_noise_stream_draws_what_one_draw_per_step_would(monkeypatch):
    """Chunks of draws, the same numbers as one draw per step, and not one draw more (a generator
    shared with later code sees the same stream)."""
    from ddpm_tutorial.sampling import noise_stream
    g, h = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    got = list(noise_stream(g, (2, 3), torch.device("cpu"), count=7, chunk=3))
    assert len(got) == 7 and all(torch.equal(z, torch.randn((2, 3), generator=h)) for z in got)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=h))


def test_ddim_eta0_is_deterministic_given_x_T(model):
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    a = ddim_sample(model, SCHEDULE, n=2, steps=6, eta=0.0, seed=1, x_T=x_T, progress=False).images
    b = ddim_sample(model, SCHEDULE, n=2, steps=6, eta=0.0, seed=99, x_T=x_T, progress=False).images
    assert torch.equal(a, b)
    c = ddim_sample(model, SCHEDULE, n=2, steps=6, eta=1.0, seed=1, x_T=x_T, progress=False).images
    d = ddim_sample(model, SCHEDULE, n=2, steps=6, eta=1.0, seed=99, x_T=x_T, progress=False).images
    assert not torch.allclose(c, d)                     # eta > 0 adds fresh noise


def test_x_T_is_the_seeds_first_draw(model):
    """x_T defaults to the seed's first N(0, I) draw, and the stream continues identically
    when x_T is passed: the same seed and the same x_T give the same samples."""
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    a = ddpm_sample(model, SCHEDULE, n=2, seed=4, progress=False, record=(19,))
    b = ddpm_sample(model, SCHEDULE, n=2, seed=4, x_T=x_T, progress=False)
    assert torch.equal(a.trajectory[19], x_T)
    assert torch.equal(a.images, b.images)


def test_ddpm_record_trajectory(model):
    out = ddpm_sample(model, SCHEDULE, n=2, seed=0, record=(19, 10, 0), progress=False)
    assert set(out.trajectory) == {19, 10, 0} == set(out.x0_trajectory)
    for k in (19, 10, 0):
        assert out.trajectory[k].shape == (2, 1, 8, 8)
        assert out.x0_trajectory[k].abs().max() <= 1
    assert not torch.equal(out.trajectory[19], out.trajectory[10])
    assert ddpm_sample(model, SCHEDULE, n=1, progress=False).trajectory == {}


def test_rederive_eps_points_ddims_direction_at_the_clipped_x0(model):
    """clip_x0 alone keeps the network's hat-eps in DDIM's direction term; with rederive_eps the
    step uses the noise the clipped hat-x_0 implies, (x_t - sqrt(ab_t) x0c) / sqrt(1 - ab_t), so
    x_s = sqrt(ab_s) x0c + sqrt(1 - ab_s) (x_t - sqrt(ab_t) x0c) / sqrt(1 - ab_t) (eta = 0)."""
    k, x_k = 15, torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ab = SCHEDULE.alpha_bar.double()
    with torch.no_grad():
        eps = model(x_k, torch.full((2,), k)).double()
    assert ((x_k - (1 - ab[k]).sqrt() * eps) / ab[k].sqrt()).abs().max() > 1.5      # the clip has work to do
    kw = dict(n=2, steps=2, t_start=k, x_T=x_k, clip_x0=True, record=(k, 0), progress=False)
    re = sample(model, SCHEDULE, "ddim", rederive_eps=True, **kw)
    x0c = re.x0_trajectory[k].double()
    expected = ab[0].sqrt() * x0c + (1 - ab[0]).sqrt() * (x_k - ab[k].sqrt() * x0c) / (1 - ab[k]).sqrt()
    torch.testing.assert_close(re.trajectory[0].double(), expected, atol=1e-5, rtol=1e-5)
    raw = sample(model, SCHEDULE, "ddim", **kw)                                     # the default: raw hat-eps
    expected_raw = ab[0].sqrt() * x0c + (1 - ab[0]).sqrt() * eps
    torch.testing.assert_close(raw.trajectory[0].double(), expected_raw, atol=1e-5, rtol=1e-5)
    assert (raw.trajectory[0] - re.trajectory[0]).abs().max() > 1e-2
    for method in ("ddpm", "dpm++2m"):        # their steps read hat-x_0 alone: the option changes nothing
        kw = dict(n=2, seed=1, clip_x0=True, progress=False, **({} if method == "ddpm" else {"steps": 4}))
        assert torch.equal(sample(model, SCHEDULE, method, rederive_eps=True, **kw).raw,
                           sample(model, SCHEDULE, method, **kw).raw)
    with pytest.raises(ValueError, match="rederive_eps re-derives the noise from the clipped hat-x_0: it needs"):
        sample(model, SCHEDULE, "ddim", n=1, steps=2, rederive_eps=True, progress=False)


def test_raw_keeps_the_unclamped_result(model):
    out = ddim_sample(model, SCHEDULE, n=3, steps=3, seed=0, progress=False)
    assert out.raw.abs().max() > 1                      # an untrained net overshoots [-1, 1]
    assert torch.equal(out.images, out.raw.clamp(-1, 1))


SUBSEQUENCE = ("ddim", "dpm++2m")       # the methods that step on a sub-sequence tau of ``steps``


def test_ddpm_is_every_step_and_refuses_a_step_count(model):
    spy = Spy(model)
    out = sample(spy, SCHEDULE, "ddpm", n=2, t_start=11, x_T=torch.zeros(2, 1, 8, 8), record=(11, 5), progress=False)
    assert [int(t[0]) for t in spy.calls] == list(range(11, -1, -1)) and set(out.trajectory) == {11, 5}
    with pytest.raises(ValueError, match="DDPM takes every step from t_start down to 0: leave steps out"):
        sample(model, SCHEDULE, "ddpm", n=1, steps=5, progress=False)


@pytest.mark.parametrize("method", SUBSEQUENCE)
def test_record_keeps_only_visited_steps(model, method):
    assert ddim_timesteps(20, 4) == [19, 13, 6, 0]
    out = sample(model, SCHEDULE, method, n=2, steps=4, record=(19, 13, 12, 0), progress=False)
    assert set(out.trajectory) == {19, 13, 0}          # 12 is not on the path
    assert set(out.trajectory) == set(out.x0_trajectory)
    assert all(v.shape == (2, 1, 8, 8) for v in out.trajectory.values())


def test_ddim_timesteps():
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    taus = ddim_timesteps(1000, 50)
    assert len(taus) == 50 and taus[0] == 999 and taus[-1] == 0
    assert all(a > b for a, b in zip(taus, taus[1:]))
    for T, steps in [(1000, 7), (1000, 999), (20, 3), (20, 2)]:
        taus = ddim_timesteps(T, steps)
        assert len(taus) == steps and taus[0] == T - 1
    assert ddim_timesteps(1000, 1) == [999]     # one step goes from pure noise, t = T
    assert ddim_timesteps(1000, 1, t_start=300) == [300]
    assert ddim_timesteps(1000, 4, t_start=300) == [300, 200, 100, 0]
    with pytest.raises(ValueError, match=r"steps must be in \[1, 10\], got 0"):
        ddim_timesteps(10, 0)
    with pytest.raises(ValueError, match=r"steps must be in \[1, 10\], got 11"):
        ddim_timesteps(10, 11)
    with pytest.raises(ValueError, match=r"steps must be in \[1, 4\], got 5"):
        ddim_timesteps(10, 5, t_start=3)
    for bad in (-1, 10):
        with pytest.raises(ValueError, match=rf"t_start must be a timestep index in \[0, 10\), got {bad}"):
            ddim_timesteps(10, 2, t_start=bad)


# --- partial noise: starting from x_t at a given step --------------------------------------------

@pytest.mark.parametrize("method", SUBSEQUENCE)
def test_t_start_starts_at_the_given_step(model, method):
    """sample(t_start=k, x_T=x_k): the first network call is at t = k on the given x_k, then
    ``steps`` calls in all, down to t = 0."""
    x_k = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    spy = Spy(model)
    out = sample(spy, SCHEDULE, method, n=2, steps=3, x_T=x_k, t_start=11, record=(11,), progress=False)
    ts = [int(t[0]) for t in spy.calls]
    assert ts == ddim_timesteps(20, 3, t_start=11) == [11, 6, 0]
    assert all(torch.equal(t, torch.full((2,), t[0].item())) for t in spy.calls)
    assert torch.equal(out.trajectory[11], x_k)
    full = sample(model, SCHEDULE, method, n=2, steps=3, x_T=x_k, progress=False)
    assert not torch.allclose(full.images, out.images)      # started at T instead: a different result


def test_partial_noise_from_a_real_image_with_the_oracle_returns_it(oracle):
    """Noise x_0 to t with Eq. 4, run the chain from there: the oracle gets x_0 back."""
    x0 = _target()
    t = torch.full((2,), 12)
    x_t = q_sample(SCHEDULE, x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    out = sample(oracle(SCHEDULE, x0), SCHEDULE, "ddim", n=2, steps=4, x_T=x_t, t_start=12, progress=False)
    torch.testing.assert_close(out.images, x0, atol=1e-4, rtol=0)


# --- the oracle that knows x_0: every sampler returns it ----------------------------------

def _target():
    x0 = torch.linspace(-0.8, 0.8, 64).reshape(1, 1, 8, 8)
    return x0.expand(2, 1, 8, 8)


def test_ddpm_with_oracle_returns_the_data_point(oracle):
    x0 = _target()
    out = ddpm_sample(oracle(SCHEDULE, x0), SCHEDULE, n=2, seed=3, record=(19, 5), progress=False)
    torch.testing.assert_close(out.images, x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.x0_trajectory[5], x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method, steps, eta", [("ddim", 20, 0.0), ("ddim", 4, 0.0), ("ddim", 1, 0.0),
                                                ("ddim", 4, 1.0), ("dpm++2m", 20, 0.0), ("dpm++2m", 5, 0.0)])
def test_samplers_with_oracle_return_the_data_point(oracle, method, steps, eta):
    x0 = _target()
    out = sample(oracle(SCHEDULE, x0), SCHEDULE, method, n=2, steps=steps, eta=eta, seed=3, progress=False)
    torch.testing.assert_close(out.images, x0, atol=1e-4, rtol=0)


# --- the step functions -----------------------------------------------------------------------

def _state(t_index, seed=0, schedule=SCHEDULE):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    t = torch.full((3,), t_index)
    xt = q_sample(schedule, x0, t, torch.randn(x0.shape, generator=g))
    eps_theta = torch.randn(x0.shape, generator=g)
    return xt, eps_theta, predict_x0_from_eps(schedule, xt, t, eps_theta)


@pytest.mark.parametrize("t_index", [1, 7, 19])
def test_ddim_eta1_one_step_is_the_ddpm_posterior(t_index):
    """Song et al. Eq. 16: with s = t - 1 and eta = 1, sigma^2 is tilde-beta_t and the DDIM step is
    the posterior mean of Eq. 7 at hat-x_0 plus sqrt(tilde-beta_t) z."""
    xt, eps_theta, x0_hat = _state(t_index)
    z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((3,), t_index)
    mean, var = q_posterior(SCHEDULE, x0_hat, xt, t)
    out = ddim_step(SCHEDULE, xt, eps_theta, x0_hat, t_index, t_index - 1, 1.0, z)
    torch.testing.assert_close(out, mean + var.sqrt() * z, atol=2e-5, rtol=1e-5)
    # eta = 0 keeps the direction to x_t instead of noise: Song et al. Eq. 12 by hand
    ab_s = SCHEDULE.alpha_bar[t_index - 1]
    torch.testing.assert_close(ddim_step(SCHEDULE, xt, eps_theta, x0_hat, t_index, t_index - 1, 0.0, None),
                               ab_s.sqrt() * x0_hat + (1 - ab_s).sqrt() * eps_theta)
    # the last step (s = None, the clean image) lands on hat-x_0
    assert torch.equal(ddim_step(SCHEDULE, xt, eps_theta, x0_hat, t_index, None, 0.0, None), x0_hat)


@pytest.mark.parametrize("t_index, s_index", [(19, 13), (13, 6), (6, 0), (6, None), (0, None)])
def test_dpmpp_2m_first_step_is_ddim_eta0(t_index, s_index):
    """Without a previous prediction DPM-Solver++ is first order: exactly DDIM with eta = 0."""
    xt, eps_theta, x0_hat = _state(t_index)
    ours = dpmpp_2m_step(SCHEDULE, xt, x0_hat, t_index, s_index, previous=None)
    ddim = ddim_step(SCHEDULE, xt, eps_theta, x0_hat, t_index, s_index, 0.0, None)
    torch.testing.assert_close(ours, ddim, atol=2e-5, rtol=1e-5)


def test_dpmpp_2m_second_order_step_by_hand():
    """Lu et al. 2022, Algorithm 2, written out in float64 with Python's math."""
    xt, _, x0_hat = _state(13)
    prev_x0 = torch.rand(xt.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ab = [float(v) for v in torch.cumprod(1 - torch.linspace(1e-3, 0.3, 20, dtype=torch.float64), 0)]
    lam = lambda i: math.log(math.sqrt(ab[i]) / math.sqrt(1 - ab[i]))       # noqa: E731
    h, h_prev = lam(6) - lam(13), lam(13) - lam(19)
    r = h_prev / h
    D = (1 + 1 / (2 * r)) * x0_hat.double() - 1 / (2 * r) * prev_x0.double()
    expected = (math.sqrt(1 - ab[6]) / math.sqrt(1 - ab[13]) * xt.double()
                - math.sqrt(ab[6]) * (math.exp(-h) - 1) * D)
    ours = dpmpp_2m_step(SCHEDULE, xt, x0_hat, 13, 6, previous=(prev_x0, torch.tensor(h_prev)))
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)
    # with the same prediction at both steps the correction vanishes: first order again
    torch.testing.assert_close(dpmpp_2m_step(SCHEDULE, xt, x0_hat, 13, 6, previous=(x0_hat, torch.tensor(h_prev))),
                               dpmpp_2m_step(SCHEDULE, xt, x0_hat, 13, 6, previous=None), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("steps", [1, 2])
def test_dpmpp_2m_equals_ddim_when_no_step_is_second_order(model, steps):
    """With one or two steps every DPM-Solver++(2M) step is first order (the first has no
    previous prediction, the last lands on hat-x_0): the samples are DDIM's with eta = 0."""
    a = sample(model, SCHEDULE, "dpm++2m", n=3, steps=steps, seed=5, progress=False)
    b = sample(model, SCHEDULE, "ddim", n=3, steps=steps, seed=5, progress=False)
    torch.testing.assert_close(a.raw, b.raw, atol=1e-5, rtol=1e-5)


def test_dpmpp_2m_differs_from_ddim_with_more_steps(model):
    a = sample(model, SCHEDULE, "dpm++2m", n=3, steps=5, seed=5, progress=False).raw
    b = sample(model, SCHEDULE, "ddim", n=3, steps=5, seed=5, progress=False).raw
    assert (a - b).abs().max() > 1e-3


def test_dpmpp_2m_is_second_order_ddim_first_order(gaussian_eps):
    """On Gaussian data the probability-flow ODE has a closed-form solution. Doubling the steps
    halves DDIM's error (first order) and quarters DPM-Solver++(2M)'s (second order)."""
    schedule = make_schedule("linear")
    alpha_bar64 = torch.cumprod(1 - linear_betas(), 0)
    net = gaussian_eps(alpha_bar64, torch.linspace(-0.6, 0.6, 64).reshape(1, 1, 8, 8), 0.3)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    exact = net.ode_solution(x_T)
    err = {(m, k): (sample(net, schedule, m, n=4, steps=k, x_T=x_T, progress=False).raw.double()
                    - exact).abs().max().item() for m in SUBSEQUENCE for k in (200, 400)}
    ddim_ratio = err["ddim", 200] / err["ddim", 400]
    dpm_ratio = err["dpm++2m", 200] / err["dpm++2m", 400]
    assert 1.5 < ddim_ratio < 2.6, err
    assert dpm_ratio > 3.5, err
    assert err["dpm++2m", 400] < err["ddim", 400] / 4, err


# --- slerp -------------------------------------------------------------------------------------

def test_slerp_hits_the_endpoints_and_keeps_the_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 1, 28, 28, generator=g), torch.randn(1, 1, 28, 28, generator=g)
    b = b * a.norm() / b.norm()                         # equal norms: slerp stays on that sphere
    torch.testing.assert_close(slerp(a, b, 0.0), a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slerp(a, b, 1.0), b, atol=1e-5, rtol=1e-5)
    for w in (0.1, 0.25, 0.5, 0.9):
        assert slerp(a, b, w).norm().item() == pytest.approx(a.norm().item(), rel=1e-5)
    # a straight line would shrink the midpoint of two independent draws to ~ sqrt(D / 2)
    assert ((a + b) / 2).norm() < 0.8 * a.norm()
    # and it moves monotonically from a to b
    cos_a = [torch.nn.functional.cosine_similarity(slerp(a, b, w).flatten(), a.flatten(), 0).item()
             for w in (0.0, 0.3, 0.6, 1.0)]
    assert cos_a == sorted(cos_a, reverse=True)


def test_slerp_of_a_tensor_with_itself_is_that_tensor():
    """cos(theta) can round to just above 1 for identical inputs; arccos must not turn that into NaN."""
    for seed in range(20):
        a = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
        out = slerp(a, a.clone(), 0.5)
        assert bool(torch.isfinite(out).all()), f"slerp(a, a) gave NaN for seed {seed}"
        torch.testing.assert_close(out, a, atol=1e-4, rtol=1e-4)


def test_slerp_refuses_different_shapes():
    with pytest.raises(ValueError, match=r"slerp needs tensors of one shape, got \(1, 4\) and \(1, 5\)"):
        slerp(torch.ones(1, 4), torch.ones(1, 5), 0.5)


# --- results that must not become images -----------------------------------------------------

def test_check_samples_refuses_nan_inf_and_divergence():
    ok = torch.zeros(2, 1, 8, 8)
    check_samples(SampleResult(images=ok, raw=ok + 5))         # overshoot of a few units is normal
    for bad in (float("nan"), float("inf"), -float("inf")):
        raw = ok.clone()
        raw[1, 0, 3, 3] = bad
        with pytest.raises(FloatingPointError, match="sampling produced NaN or inf"):
            check_samples(SampleResult(images=raw.clamp(-1, 1), raw=raw))
    with pytest.raises(FloatingPointError, match="far outside"):
        check_samples(SampleResult(images=ok, raw=ok + 1e4))
    with pytest.raises(FloatingPointError, match="NaN or inf"):          # without raw: the images
        check_samples(SampleResult(images=torch.full((1, 1, 8, 8), float("nan"))))


def test_a_diverged_network_is_caught(model, monkeypatch):
    nan_net = Spy(model)
    monkeypatch.setattr(nan_net, "forward", lambda x, t: torch.full_like(x, float("nan")))
    out = ddim_sample(nan_net, SCHEDULE, n=2, steps=2, progress=False)
    with pytest.raises(FloatingPointError):
        check_samples(out)


def test_sampling_bad_inputs(model):
    with pytest.raises(ValueError, match=r"n \(the number of samples\) must be an integer >= 1, got 0"):
        ddpm_sample(model, SCHEDULE, n=0, progress=False)
    with pytest.raises(ValueError, match=r"x_T must have shape \(2, 1, 8, 8\), got \(2, 1, 4, 4\)"):
        ddim_sample(model, SCHEDULE, n=2, steps=2, x_T=torch.zeros(2, 1, 4, 4), progress=False)
    for bad in (-0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            ddim_sample(model, SCHEDULE, n=2, steps=2, eta=bad, progress=False)
    with pytest.raises(ValueError, match=r"steps must be in \[1, 20\], got 21"):
        ddim_sample(model, SCHEDULE, n=1, steps=21, progress=False)
    with pytest.raises(ValueError, match=r"method must be one of \('ddpm', 'ddim', 'dpm\+\+2m'\), got 'euler'"):
        sample(model, SCHEDULE, "euler", n=1, steps=2, progress=False)
    with pytest.raises(ValueError, match="eta applies to DDIM only"):
        sample(model, SCHEDULE, "dpm++2m", n=1, steps=2, eta=0.5, progress=False)


def test_p_sample_is_what_the_ddpm_loop_runs(model):
    """One DDPM step by hand from the loop's own noise stream equals the loop's first step."""
    out = ddpm_sample(model, SCHEDULE, n=2, seed=7, record=(19, 18), progress=False)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 1, 8, 8, generator=g)
    t = torch.full((2,), 19)
    with torch.no_grad():
        x_prev, _ = p_sample(SCHEDULE, x, t, model(x, t), torch.randn(x.shape, generator=g))
    torch.testing.assert_close(out.trajectory[18], x_prev)
