"""v-prediction (Salimans & Ho 2022) and zero terminal SNR (Lin et al. 2024): the schedule, the
target, the reading of the network's output, the loss, every sampler, training and checkpoints."""
import dataclasses

import pytest
import torch

from ddpm_tutorial import export
from ddpm_tutorial.checkpoint import model_from_checkpoint
from ddpm_tutorial.config import DiffusionConfig
from ddpm_tutorial.diffusion import (eps_and_x0, loss_simple, loss_weight, p_sample, predict_x0_from_eps,
                                     q_sample, v_target)
from ddpm_tutorial.sampling import ddpm_sample, sample
from ddpm_tutorial.schedules import NoiseSchedule, linear_betas, make_schedule, rescale_zero_terminal_snr
from ddpm_tutorial.train import build_trainer

T = 50
V = make_schedule(T=T, beta_end=0.2, prediction="v")
ZTSNR = make_schedule(T=T, beta_end=0.2, zero_terminal_snr=True, prediction="v")


def _data(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((n, 1, 8, 8), generator=g) * 2 - 1
    return x0, torch.randn(x0.shape, generator=g)


def test_zero_terminal_snr_is_lin_et_al_algorithm_1():
    """sqrt(bar-alpha) is shifted and scaled: its first value kept, its last exactly 0."""
    plain = make_schedule(T=T, beta_end=0.2)
    old, new = plain.sqrt_alpha_bar.double(), ZTSNR.sqrt_alpha_bar.double()
    assert ZTSNR.alpha_bar[-1] == 0 and ZTSNR.snr[-1] == 0 and ZTSNR.beta[-1] == 1
    assert new[0] == pytest.approx(old[0].item(), abs=1e-7)
    scale = old[0] / (old[0] - old[-1])
    torch.testing.assert_close(new, (old - old[-1]) * scale, atol=1e-6, rtol=0)
    assert (ZTSNR.alpha_bar[1:] < ZTSNR.alpha_bar[:-1]).all()          # still decreasing
    betas = rescale_zero_terminal_snr(linear_betas(1000))
    assert ((betas[:-1] > 0) & (betas[:-1] < 1)).all() and betas[-1] == 1


def test_zero_terminal_snr_refuses_eps_prediction():
    with pytest.raises(ValueError, match="needs prediction='v'"):
        make_schedule(T=T, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="needs prediction='v'"):
        DiffusionConfig(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="prediction must be one of"):
        NoiseSchedule.from_betas(linear_betas(T), prediction="x0")
    with pytest.raises(ValueError, match="the last may be 1"):
        NoiseSchedule.from_betas(torch.tensor([0.1, 1.0, 0.2]), prediction="v")


def test_from_config_carries_the_prediction_to_every_device():
    s = NoiseSchedule.from_config(DiffusionConfig(T=T, prediction="v", zero_terminal_snr=True))
    assert s.prediction == "v" and s.to("cpu").prediction == "v" and s.alpha_bar[-1] == 0
    assert NoiseSchedule.from_config(DiffusionConfig(T=T)).prediction == "eps"


@pytest.mark.parametrize("schedule", [V, ZTSNR], ids=["linear", "zero-terminal-snr"])
def test_v_read_back_gives_the_true_eps_and_x0(schedule):
    x0, eps = _data()
    t = torch.tensor([0, 7, 30, T - 1])
    xt = q_sample(schedule, x0, t, eps)
    eps_hat, x0_hat = eps_and_x0(schedule, xt, t, v_target(schedule, x0, t, eps))
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=0)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=0)


def test_eps_prediction_reads_the_output_as_eps():
    plain = make_schedule(T=T, beta_end=0.2)
    x0, eps = _data()
    t = torch.tensor([0, 7, 30, T - 1])
    xt = q_sample(plain, x0, t, eps)
    out = torch.randn_like(xt)
    eps_hat, x0_hat = eps_and_x0(plain, xt, t, out)
    assert eps_hat is out and torch.equal(x0_hat, predict_x0_from_eps(plain, xt, t, out))


def test_v_loss_is_the_eps_loss_divided_by_alpha_bar():
    """eps_hat - eps = sqrt(bar-alpha_t) (v_hat - v) at fixed x_t: the v-loss weights the noise
    error by 1 / bar-alpha_t, i.e. more at the noisy timesteps than L_simple does."""
    x0, eps = _data()
    t = torch.tensor([3, 10, 25, 40])
    xt = q_sample(V, x0, t, eps)
    v_hat = torch.randn_like(xt)
    eps_hat, _ = eps_and_x0(V, xt, t, v_hat)
    v_err = ((v_hat - v_target(V, x0, t, eps)) ** 2).mean(dim=(1, 2, 3))
    eps_err = ((eps_hat - eps) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(eps_err / V.alpha_bar[t], v_err, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("schedule", [V, ZTSNR], ids=["linear", "zero-terminal-snr"])
def test_loss_simple_with_v_targets_v(schedule, oracle_v):
    x0, eps = _data(n=1)
    x0 = x0.expand(4, -1, -1, -1)
    t = torch.tensor([0, 10, 30, T - 1])
    assert loss_simple(oracle_v(schedule, x0[:1]), schedule, x0, t, eps.expand(4, -1, -1, -1)) < 1e-10
    zero = loss_simple(lambda xt, t: torch.zeros_like(xt), schedule, x0, t, eps.expand(4, -1, -1, -1),
                       reduction="none")
    target = v_target(schedule, x0, t, eps.expand(4, -1, -1, -1))
    torch.testing.assert_close(zero, (target ** 2).mean(dim=(1, 2, 3)))


def test_min_snr_weight_for_v_prediction():
    """min(SNR, gamma) / (SNR + 1) for v (Hang et al. 2023), finite where SNR = 0."""
    w = loss_weight(ZTSNR, "min_snr", gamma=5.0)
    snr = ZTSNR.snr
    torch.testing.assert_close(w, snr.clamp(max=5.0) / (snr + 1))
    assert torch.isfinite(w).all() and w[-1] == 0


@pytest.mark.parametrize("schedule", [V, ZTSNR], ids=["linear", "zero-terminal-snr"])
@pytest.mark.parametrize("method, eta", [("ddim", 0.0), ("ddim", 1.0), ("dpm++2m", 0.0)])
def test_samplers_with_the_v_oracle_return_the_data_point(schedule, method, eta, oracle_v):
    x0, _ = _data(n=1)
    out = sample(oracle_v(schedule, x0), schedule, method, n=3, steps=10, eta=eta, seed=1, progress=False)
    torch.testing.assert_close(out.raw, x0.expand(3, -1, -1, -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("schedule", [V, ZTSNR], ids=["linear", "zero-terminal-snr"])
def test_ddpm_with_the_v_oracle_returns_the_data_point(schedule, oracle_v):
    x0, _ = _data(n=1)
    out = ddpm_sample(oracle_v(schedule, x0), schedule, n=3, seed=1, progress=False)
    torch.testing.assert_close(out.raw, x0.expand(3, -1, -1, -1), atol=1e-4, rtol=0)


def test_p_sample_of_v_matches_the_eps_form(oracle, oracle_v):
    """The same denoiser as eps or as v gives the same reverse step (Eq. 11 = Eq. 7)."""
    eps_schedule = make_schedule(T=T, beta_end=0.2)
    x0, _ = _data(n=1)
    xt, t, z = torch.randn(2, 1, 8, 8), torch.tensor([30, 5]), torch.randn(2, 1, 8, 8)
    a, a_x0 = p_sample(eps_schedule, xt, t, oracle(eps_schedule, x0)(xt, t), z)
    b, b_x0 = p_sample(V, xt, t, oracle_v(V, x0)(xt, t), z)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_x0, b_x0, atol=1e-5, rtol=1e-5)


def test_trainer_learns_v_and_the_checkpoint_keeps_it(make_preset, tiny_images, tmp_path):
    preset = make_preset(steps=6)
    preset = dataclasses.replace(preset, diffusion=DiffusionConfig(T=100, prediction="v", zero_terminal_snr=True))
    trainer = build_trainer(preset, tiny_images(), device="cpu")
    assert trainer.schedule.prediction == "v" and trainer.schedule.alpha_bar[-1] == 0
    history = trainer.fit(progress=False)
    assert all(torch.isfinite(torch.tensor(history.loss)))
    path = trainer.save(tmp_path / "v.pt")
    model, schedule, _ = model_from_checkpoint(path)
    assert schedule.prediction == "v" and schedule.alpha_bar[-1] == 0
    out = sample(model, schedule, "ddim", n=2, steps=5, progress=False)
    assert torch.isfinite(out.raw).all()
    with pytest.raises(ValueError, match="eps-prediction models only"):
        export.schedule_coefficients(schedule)
