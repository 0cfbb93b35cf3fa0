"""Our forward noising and reverse step against an independent implementation:
diffusers' ``DDPMScheduler`` (a test-only dependency).

What diffusers' settings mean here (read from diffusers/schedulers/scheduling_ddpm.py, 0.42):

- ``variance_type="fixed_large"`` is sigma_t^2 = beta_t, recomputed as
  ``1 - alphas_cumprod[t] / alphas_cumprod[t-1]``; no noise is added at ``t == 0``
  (its ``if t > 0`` guard), exactly like our ``p_sample``. This version does *not*
  substitute beta_tilde at the first step (the paper's released code does, in
  ``np.append(posterior_variance[1], betas[1:])``, but that only matters for the
  likelihood, since no noise is added at t = 0 anyway).
- ``step`` draws its noise with ``torch.randn(shape, generator=g, dtype=model_output.dtype)``
  on the CPU; it has no ``variance_noise`` argument, so we redraw the same z from a
  generator seeded identically.
- diffusers keeps ``alphas_cumprod`` in float32 and recovers beta_t = 1 - ab_t / ab_{t-1}
  and 1 - ab_t by subtraction. For small t, where ab_t is within 3e-4 of 1, that
  cancellation costs digits: its own step differs from the same formula evaluated
  with a float64 schedule by up to ~1e-4 (measured: 8e-5 at t = 2, 2e-5 at t = 10,
  <4e-6 from t = 20 on). Our schedule is computed in float64 and stored in float32,
  so we compare in two ways: against diffusers' step run on a float64 ``alphas_cumprod``
  (same code, better arithmetic) to 1e-5 at every t, and against diffusers as shipped
  to 1e-5 for t >= 20 and to 2e-4 below, the gap above being diffusers' rounding.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler  # noqa: E402

from ddpm_tutorial.diffusion import p_sample, q_sample  # noqa: E402
from ddpm_tutorial.schedules import linear_betas, make_schedule  # noqa: E402

TIMESTEPS = (999, 998, 500, 100, 20, 10, 2, 1, 0)
SHAPE = (8, 1, 8, 8)


def reference(clip: bool, float64: bool = False) -> DDPMScheduler:
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                        beta_end=0.02, variance_type="fixed_large", clip_sample=clip,
                        prediction_type="epsilon")
    if float64:
        ref.alphas_cumprod = torch.cumprod(1 - linear_betas(1000, 1e-4, 0.02), 0)
        ref.one = torch.tensor(1.0, dtype=torch.float64)
    return ref


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(SHAPE, generator=g) * 2 - 1
    eps = torch.randn(SHAPE, generator=g)
    eps_theta = eps + 0.3 * torch.randn(SHAPE, generator=g)     # an imperfect network
    return x0, eps, eps_theta


def test_add_noise_matches_q_sample():
    ours = make_schedule("linear")
    ref = reference(clip=False)
    x0, eps, _ = _data()
    t = torch.tensor([0, 1, 2, 10, 100, 500, 998, 999])
    torch.testing.assert_close(q_sample(ours, x0, t, eps), ref.add_noise(x0, eps, t), atol=1e-5, rtol=0)
    for t_index in TIMESTEPS:
        tt = torch.full((SHAPE[0],), t_index)
        torch.testing.assert_close(q_sample(ours, x0, tt, eps), ref.add_noise(x0, eps, tt),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("clip", [False, True], ids=["no_clip", "clip_x0"])
@pytest.mark.parametrize("t_index", TIMESTEPS)
def test_reverse_step_matches_diffusers(t_index, clip):
    ours = make_schedule("linear")
    x0, eps, eps_theta = _data(seed=t_index)
    t = torch.full((SHAPE[0],), t_index)
    xt = q_sample(ours, x0, t, eps)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(123))
    x_prev, x0_hat = p_sample(ours, xt, t, eps_theta, z, clip_x0=clip)

    # hat-x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) amplifies float32 rounding of x_t
    # by 1/sqrt(ab_t) (157 at t = 999), in any implementation: scale its tolerance so
    x0_atol = 1e-5 / ours.sqrt_alpha_bar[t_index].item()

    # 1. the same algorithm in float64: agrees to 1e-5 at every t
    out64 = reference(clip, float64=True).step(eps_theta, t_index, xt.double(),
                                               generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(x_prev.double(), out64.prev_sample, atol=1e-5, rtol=0)
    torch.testing.assert_close(x0_hat.double(), out64.pred_original_sample, atol=x0_atol, rtol=0)

    # 2. diffusers as shipped (float32 schedule)
    out = reference(clip).step(eps_theta, t_index, xt, generator=torch.Generator().manual_seed(123))
    atol = 1e-5 if t_index >= 20 else 2e-4      # see the module docstring
    torch.testing.assert_close(x_prev, out.prev_sample, atol=atol, rtol=0)
    torch.testing.assert_close(x0_hat, out.pred_original_sample, atol=max(atol, x0_atol), rtol=0)

    if clip:
        assert x0_hat.abs().max() <= 1
    if t_index == 999:   # the step is noisy and hat-x_0 far outside [-1, 1]: clipping matters
        assert not torch.allclose(x_prev, p_sample(ours, xt, t, eps_theta, z, clip_x0=not clip)[0])
    if t_index == 0:     # no noise: a different generator changes nothing on either side
        other = reference(clip).step(eps_theta, 0, xt, generator=torch.Generator().manual_seed(7))
        assert torch.equal(other.prev_sample, out.prev_sample)
        assert torch.equal(p_sample(ours, xt, t, eps_theta, torch.randn_like(z), clip_x0=clip)[0], x_prev)


def test_cosine_schedule_matches_squaredcos_cap_v2():
    """diffusers' "squaredcos_cap_v2" (GLIDE / Nichol & Dhariwal) is the same formula as our
    cosine schedule: beta_t = min(1 - f(t)/f(t-1), 0.999), s = 0.008. The betas agree to
    float32 rounding; alpha_bar differs only by diffusers' float32 cumprod (~3e-7)."""
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    ours = make_schedule("cosine")
    torch.testing.assert_close(ours.beta, ref.betas, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(ours.alpha_bar, ref.alphas_cumprod, atol=1e-6, rtol=0)
    assert ours.beta[-1].item() == pytest.approx(0.999) and ref.betas[-1].item() == pytest.approx(0.999)
    # and it is really a different schedule from the linear one
    assert (ours.alpha_bar - make_schedule("linear").alpha_bar).abs().max() > 0.1


# --- DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler -------------------------
#
# How diffusers' scheduler is aligned with ours (read from scheduling_dpmsolver_multistep.py, 0.42):
# - timesteps: its default "linspace" spacing drops t = 0 and jumps from its last timestep
#   straight to sigma = 0; ours (ddim_timesteps) ends with a network call at t = 0. So we pass
#   our sub-sequence as custom ``timesteps=``: its sigmas are then sqrt((1 - ab_t) / ab_t) at
#   exactly those integer steps, with sigma = 0 (the clean image) appended.
# - final step: with final_sigmas_type="zero" its last step is first order (lower_order_final),
#   x_0 = hat-x_0, as in our dpmpp_2m_step at s = None; its first step is first order too
#   (no previous output), as ours.
# - precision: ``step`` casts the sample to float32 and set_timesteps stores sigmas as float32.
#   For the float64 comparison we therefore drive the scheduler's own conversion and update
#   functions (convert_model_output, dpm_solver_first_order_update,
#   multistep_dpm_solver_second_order_update) with float64 sigmas and the same order choice as
#   ``step``; the shipped ``step`` is compared as is, in float32, separately.

from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from ddpm_tutorial.sampling import ddim_timesteps, sample  # noqa: E402
from ddpm_tutorial.schedules import NoiseSchedule  # noqa: E402


def dpm_reference() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                       beta_end=0.02, algorithm_type="dpmsolver++", solver_order=2,
                                       solver_type="midpoint", prediction_type="epsilon",
                                       final_sigmas_type="zero", lower_order_final=True, thresholding=False)


def float64_schedule(T: int = 1000) -> NoiseSchedule:
    """Our linear schedule with every buffer kept in float64 (the package stores float32)."""
    beta = linear_betas(T, 1e-4, 0.02)
    alpha = 1 - beta
    ab = torch.cumprod(alpha, 0)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    return NoiseSchedule(beta=beta, alpha=alpha, alpha_bar=ab, alpha_bar_prev=ab_prev, sqrt_alpha_bar=ab.sqrt(),
                         sqrt_one_minus_alpha_bar=(1 - ab).sqrt(), beta_tilde=(1 - ab_prev) / (1 - ab) * beta,
                         posterior_mean_coef_x0=ab_prev.sqrt() * beta / (1 - ab),
                         posterior_mean_coef_xt=alpha.sqrt() * (1 - ab_prev) / (1 - ab))


def _gaussian_net(gaussian_eps, alpha_bar):
    return gaussian_eps(alpha_bar, torch.linspace(-0.6, 0.6, 64).reshape(1, 1, 8, 8), 0.3)


def _x_T(dtype):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("steps", [3, 10, 25])
def test_dpmpp_2m_matches_diffusers_float64(gaussian_eps, steps):
    schedule = float64_schedule()
    net = _gaussian_net(gaussian_eps, schedule.alpha_bar)
    taus = ddim_timesteps(1000, steps)

    ref = dpm_reference()
    ref.alphas_cumprod = schedule.alpha_bar
    ref.set_timesteps(timesteps=taus)
    assert ref.timesteps.tolist() == taus                       # the same sub-sequence, t = 0 included
    ab = schedule.alpha_bar[taus]
    ref.sigmas = torch.cat([((1 - ab) / ab).sqrt(), ab.new_zeros(1)])    # float64, sigma = 0 last
    x = _x_T(torch.float64)
    for i, t in enumerate(ref.timesteps):
        ref._step_index = i
        eps = net(x, t).float().double()          # our loop rounds the network output to float32 too
        m = ref.convert_model_output(eps, sample=x)
        ref.model_outputs = [ref.model_outputs[-1], m]
        first_order = i == 0 or i == len(taus) - 1           # `step`'s choice for solver_order=2
        x = (ref.dpm_solver_first_order_update(m, sample=x) if first_order
             else ref.multistep_dpm_solver_second_order_update(ref.model_outputs, sample=x))

    ours = sample(net, schedule, "dpm++2m", n=SHAPE[0], steps=steps, x_T=_x_T(torch.float64), progress=False)
    assert ours.raw.dtype == torch.float64
    torch.testing.assert_close(ours.raw, x, atol=1e-9, rtol=0)
    # and it is not DDIM: the second-order correction is what was compared
    if steps > 2:
        ddim = sample(net, schedule, "ddim", n=SHAPE[0], steps=steps, x_T=_x_T(torch.float64), progress=False)
        assert (ddim.raw - x).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [3, 10, 25])
def test_dpmpp_2m_matches_diffusers_step_as_shipped(gaussian_eps, steps):
    """diffusers' own ``step`` loop (float32, its float32 schedule) against ours (float32 buffers
    computed in float64): the same algorithm up to float32 rounding of the schedule (measured
    up to 6e-5 with 3 steps, where hat-x_0 at t = 999 amplifies it by 1/sqrt(ab) = 157)."""
    net = _gaussian_net(gaussian_eps, torch.cumprod(1 - linear_betas(), 0))
    taus = ddim_timesteps(1000, steps)
    ref = dpm_reference()
    ref.set_timesteps(timesteps=taus)
    x = _x_T(torch.float32)
    for t in ref.timesteps:
        x = ref.step(net(x, t), t, x).prev_sample
    ours = sample(net, make_schedule("linear"), "dpm++2m", n=SHAPE[0], steps=steps, x_T=_x_T(torch.float32),
                  progress=False)
    torch.testing.assert_close(ours.raw, x, atol=2e-4, rtol=0)
