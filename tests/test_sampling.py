"""Sampling: determinism, recorded trajectories, DDIM sub-sequences, and the loops' math
checked with an oracle denoiser that knows the data point."""
import pytest
import torch
from torch import nn

from ddpm_tutorial.config import ModelConfig
from ddpm_tutorial.sampling import ddim_sample, ddim_timesteps, ddpm_sample
from ddpm_tutorial.schedules import make_schedule
from ddpm_tutorial.unet import UNet

# a short schedule whose alpha_bar still ends near 0 (beta_end larger than the paper's, for T = 20)
SCHEDULE = make_schedule("linear", T=20, beta_start=1e-3, beta_end=0.3)
CFG = ModelConfig(image_size=8, base_channels=8, channel_mults=(1, 2), groups=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet(CFG).eval()


class Oracle(nn.Module):
    """eps_theta(x_t, t) = (x_t - sqrt(bar-alpha_t) x_0) / sqrt(1 - bar-alpha_t) for one known x_0."""

    def __init__(self, schedule, x0):
        super().__init__()
        self.schedule, self.x0 = schedule, x0
        self.config = ModelConfig(image_size=x0.shape[-1], base_channels=8, channel_mults=(1,), groups=4)
        self.dummy = nn.Parameter(torch.zeros(()))     # for the device lookup

    def forward(self, xt, t):
        s = self.schedule
        return ((xt - s.sqrt_alpha_bar[t].reshape(-1, 1, 1, 1) * self.x0)
                / s.sqrt_one_minus_alpha_bar[t].reshape(-1, 1, 1, 1))


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


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_same_seed_same_samples(model, eta):
    a = ddim_sample(model, SCHEDULE, n=3, steps=5, eta=eta, seed=1, progress=False).images
    b = ddim_sample(model, SCHEDULE, n=3, steps=5, eta=eta, seed=1, progress=False).images
    c = ddim_sample(model, SCHEDULE, n=3, steps=5, eta=eta, seed=2, progress=False).images
    assert a.shape == (3, 1, 8, 8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


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


def test_ddim_record_keeps_only_visited_steps(model):
    assert ddim_timesteps(20, 4) == [19, 13, 6, 0]
    out = ddim_sample(model, SCHEDULE, n=2, steps=4, record=(19, 13, 12, 0), progress=False)
    assert set(out.trajectory) == {19, 13, 0}          # 12 is not on the DDIM path
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
    with pytest.raises(ValueError, match=r"DDIM steps must be in \[1, 10\], got 0"):
        ddim_timesteps(10, 0)
    with pytest.raises(ValueError, match=r"DDIM steps must be in \[1, 10\], got 11"):
        ddim_timesteps(10, 11)


def _target():
    x0 = torch.linspace(-0.8, 0.8, 64).reshape(1, 1, 8, 8)
    return x0.expand(2, 1, 8, 8)


def test_ddpm_with_oracle_returns_the_data_point():
    x0 = _target()
    out = ddpm_sample(Oracle(SCHEDULE, x0), SCHEDULE, n=2, seed=3, record=(19, 5), progress=False)
    torch.testing.assert_close(out.images, x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.x0_trajectory[5], x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("steps, eta", [(20, 0.0), (4, 0.0), (1, 0.0), (4, 1.0)])
def test_ddim_with_oracle_returns_the_data_point(steps, eta):
    x0 = _target()
    out = ddim_sample(Oracle(SCHEDULE, x0), SCHEDULE, n=2, steps=steps, eta=eta, seed=3, progress=False)
    torch.testing.assert_close(out.images, x0, atol=1e-4, rtol=0)


def test_sampling_bad_inputs(model):
    with pytest.raises(ValueError, match="number of samples must be >= 1, got 0"):
        ddpm_sample(model, SCHEDULE, n=0, progress=False)
    with pytest.raises(ValueError, match=r"x_T must have shape \(2, 1, 8, 8\), got \(2, 1, 4, 4\)"):
        ddim_sample(model, SCHEDULE, n=2, steps=2, x_T=torch.zeros(2, 1, 4, 4), progress=False)
    with pytest.raises(ValueError, match="eta must be >= 0, got -0.5"):
        ddim_sample(model, SCHEDULE, n=2, steps=2, eta=-0.5, progress=False)
    with pytest.raises(ValueError, match=r"DDIM steps must be in \[1, 20\], got 21"):
        ddim_sample(model, SCHEDULE, n=1, steps=21, progress=False)
