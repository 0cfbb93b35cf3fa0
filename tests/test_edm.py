"""EDM (Karras et al. 2022): the preconditioning's limit, Heun against the exact ODE solution of
Gaussian data, churn, the loss's weight, and the DDPM network on EDM's loop reproducing DDIM."""
import math
from types import SimpleNamespace

import pytest
import torch

from ddpm_tutorial.config import ModelConfig
from ddpm_tutorial.edm import (DDPMDenoiser, EDMDenoiser, churn_gammas, edm_loss, edm_sample, heun_step,
                               network_calls, preconditioning, sigma_grid)
from ddpm_tutorial.sampling import ddim_timesteps, sample
from ddpm_tutorial.schedules import make_schedule
from ddpm_tutorial.unet import UNet

SCHEDULE = make_schedule("linear", T=20, beta_start=1e-3, beta_end=0.3)
CFG = ModelConfig(image_size=8, base_channels=8, channel_mults=(1, 2), groups=4)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return UNet(CFG, T=SCHEDULE.T).eval()


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of data y ~ N(mu, s^2) per coordinate: E[y | y + sigma n] =
    mu + s^2 / (s^2 + sigma^2) (x - mu). Its ODE's solution is known in closed form:
    (x - mu) / sqrt(s^2 + sigma^2) stays constant along a trajectory."""

    def __init__(self, mu=0.3, s=0.5):
        super().__init__()
        self.mu, self.s, self.calls = mu, s, 0
        self.config = SimpleNamespace(in_channels=1, image_size=4)
        self.sigma_min, self.sigma_max = 0.002, 80.0

    def forward(self, x, sigma):
        self.calls += 1
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.mu)

    def prior_std(self, sigma):
        return sigma

    def exact(self, x, sigma_from, sigma_to):
        return self.mu + (x - self.mu) * math.sqrt(self.s ** 2 + sigma_to ** 2) / math.sqrt(self.s ** 2 + sigma_from ** 2)


def test_preconditioning_table_1():
    sigma = torch.tensor([0.01, 0.5, 80.0])
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, 0.5)
    torch.testing.assert_close(c_skip, 0.25 / (sigma ** 2 + 0.25))
    torch.testing.assert_close(c_out, sigma * 0.5 / (sigma ** 2 + 0.25).sqrt())
    torch.testing.assert_close(c_in * (sigma ** 2 + 0.25).sqrt(), torch.ones(3))
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # the target (y - c_skip x) / c_out has unit variance when y has std sigma_data (Appendix B.6)
    torch.testing.assert_close(c_skip ** 2 * sigma ** 2 + (1 - c_skip) ** 2 * 0.25, c_out ** 2)


def test_preconditioned_output_at_small_sigma_returns_its_input(net):
    D = EDMDenoiser(net)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(D(x, 1e-6), x, atol=1e-5, rtol=0)
        assert (D(x, 1.0) - x).abs().max() > 1e-2          # at a real noise level the network acts


def test_time_input_spans_the_networks_timesteps(net):
    D = EDMDenoiser(net)
    c_noise = torch.tensor([math.log(0.002), math.log(80.0), math.log(1e-5), math.log(1e4)]) / 4
    assert D.time_input(c_noise).tolist() == [0, SCHEDULE.T - 1, 0, SCHEDULE.T - 1]


def test_sigma_grid_eq_5():
    s = sigma_grid(18)
    assert len(s) == 19 and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert (s[1:] < s[:-1]).all()
    torch.testing.assert_close(sigma_grid(5, 1.0, 5.0, rho=1.0)[:-1], torch.linspace(5, 1, 5, dtype=torch.float64))


def test_heun_matches_the_exact_ode_solution_and_beats_euler():
    D = GaussianDenoiser()
    x_T = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = D.exact(x_T * 80.0, 80.0, 0.0)
    heun = edm_sample(D, 64, steps=64, x_T=x_T, device="cpu", progress=False).raw
    euler = edm_sample(D, 64, steps=64, x_T=x_T, device="cpu", progress=False, order=1).raw
    err_heun, err_euler = (heun - exact).abs().max().item(), (euler - exact).abs().max().item()
    assert err_heun < 1e-2, err_heun                      # samples of std ~0.5
    assert err_euler > 10 * err_heun
    # second order: doubling the steps cuts Heun's error by about 4 (Euler's by 2)
    heun128 = edm_sample(D, 64, steps=128, x_T=x_T, device="cpu", progress=False).raw
    assert (heun128 - exact).abs().max().item() < err_heun / 3


def test_heun_step_counts_network_calls():
    D = GaussianDenoiser()
    edm_sample(D, 2, steps=10, device="cpu", progress=False)
    assert D.calls == network_calls(10) == 19


def test_churn_gammas_and_a_churned_sampler_stays_near_the_data():
    sigmas = sigma_grid(10)
    g = churn_gammas(sigmas, S_churn=80, S_tmin=0.05, S_tmax=50)
    assert g[0] == 0 and max(g) == pytest.approx(math.sqrt(2) - 1) and g[-1] == 0
    assert churn_gammas(sigmas) == [0.0] * 10
    D = GaussianDenoiser()
    # the churned sampler's distribution is the data's, up to its discretisation (std 0.5085 at 80 steps)
    x = edm_sample(D, 4000, steps=80, S_churn=80, S_tmin=0.01, S_tmax=50, device="cpu", progress=False).raw
    assert x.mean().item() == pytest.approx(D.mu, abs=0.01) and x.std().item() == pytest.approx(D.s, abs=0.015)
    x_det = edm_sample(D, 4000, steps=80, device="cpu", progress=False).raw
    assert not torch.allclose(x, x_det)


def test_heun_step_with_churn_adds_the_stated_noise():
    ident = lambda x, sigma: torch.zeros_like(x)          # D = 0: d = x / sigma_hat
    x, z = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)
    out = heun_step(ident, x, 1.0, 0.0, gamma=math.sqrt(2) - 1, S_noise=1.0, z=z, order=2)
    torch.testing.assert_close(out, torch.zeros_like(x))  # Euler to sigma 0 returns D
    out = heun_step(ident, x, 1.0, 0.5, gamma=math.sqrt(2) - 1, S_noise=1.0, z=z, order=1)
    torch.testing.assert_close(out, (1 + 2.0) * 0.5 / math.sqrt(2) * torch.ones_like(x))


def test_edm_loss_is_the_unit_weighted_error_of_F(net):
    D = EDMDenoiser(net)
    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0])
    with torch.no_grad():
        loss = edm_loss(D, x0, sigma, noise, reduction="none")
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in preconditioning(sigma))
        x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
        F = net(c_in * x, D.time_input(c_noise.flatten()))
        target = (x0 - c_skip * x) / c_out
        torch.testing.assert_close(loss, ((F - target) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    assert edm_loss(D, x0, generator=g).requires_grad


def test_ddpm_network_with_euler_on_ddim_sigmas_reproduces_ddim(net):
    """EDM section 3: with sigma_t = sqrt((1 - bar-alpha_t) / bar-alpha_t) and x = x_t / sqrt(bar-alpha_t),
    an Euler step of the ODE is exactly a DDIM step with eta = 0."""
    D = DDPMDenoiser(net, SCHEDULE)
    steps, x_T = 6, torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    taus = ddim_timesteps(SCHEDULE.T, steps)
    sigmas = torch.cat([D.sigmas[taus], D.sigmas.new_zeros(1)])
    ours = edm_sample(D, 3, sigmas=sigmas, order=1, x_T=x_T, progress=False).raw
    ddim = sample(net, SCHEDULE, "ddim", n=3, steps=steps, eta=0.0, x_T=x_T, progress=False).raw
    torch.testing.assert_close(ours, ddim, atol=1e-4, rtol=1e-4)
    heun = edm_sample(D, 3, sigmas=sigmas, order=2, x_T=x_T, progress=False).raw
    assert (heun - ddim).abs().max() > 1e-3                 # Heun is a different (2nd-order) method


def test_ddpm_denoiser_timesteps_and_range(net):
    D = DDPMDenoiser(net, SCHEDULE)
    assert D.timestep(D.sigmas.float()).tolist() == list(range(SCHEDULE.T))
    assert D.timestep(torch.tensor([1e-9, 1e9])).tolist() == [0, SCHEDULE.T - 1]
    assert D.sigma_max == pytest.approx(math.sqrt((1 - SCHEDULE.alpha_bar[-1].item()) / SCHEDULE.alpha_bar[-1].item()))
    v = make_schedule("linear", T=20, beta_start=1e-3, beta_end=0.3, prediction="v")
    with pytest.raises(ValueError, match="eps-prediction"):
        DDPMDenoiser(net, v)


def test_edm_sample_refuses_bad_grids(net):
    D = EDMDenoiser(net)
    with pytest.raises(ValueError, match="end at 0"):
        edm_sample(D, 1, sigmas=torch.tensor([2.0, 1.0]), progress=False)
    with pytest.raises(ValueError, match="order"):
        edm_sample(D, 1, steps=2, order=3, progress=False)
