"""Checks at the door: a learner's bad call gets a clear error at the function it called, the
functions the chapters display are the equations alone, and nothing is checked twice inside."""
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_tutorial.checks as checks
from ddpm_tutorial import diffusion, sampling
from ddpm_tutorial.schedules import make_schedule
from ddpm_tutorial.unet import UNet
from ddpm_tutorial.widgets import slider_html

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import refresh_sources  # noqa: E402

SCHEDULE = make_schedule("linear", T=20, beta_start=1e-3, beta_end=0.3)
DISPLAYED = [diffusion.q_sample, diffusion.q_step, diffusion.q_posterior, diffusion.predict_x0_from_eps,
             diffusion.predict_eps_from_x0, diffusion.v_target, diffusion.eps_and_x0, diffusion.eps_posterior_mean,
             diffusion.loss_simple, diffusion.p_sample]


@pytest.mark.parametrize("fn", DISPLAYED, ids=lambda f: f.__name__)
def test_displayed_source_is_the_equation_alone(fn):
    """What viz.show_source and tools/refresh_sources.py render: the def, the docstring and the
    equation; no decorator line, no check."""
    source = inspect.getsource(fn)
    assert source.startswith(f"def {fn.__name__}("), source[:80]
    body = source.split('"""')[2]
    assert "check" not in body and "raise" not in body, body
    assert refresh_sources.rendered(fn) == f"```python\n{source.rstrip()}\n```"


@pytest.fixture(scope="module")
def model():
    from ddpm_tutorial.config import ModelConfig
    torch.manual_seed(0)
    return UNet(ModelConfig(image_size=8, base_channels=8, channel_mults=(1,), groups=4), T=20).eval()


def _batch(B=3):
    g = torch.Generator().manual_seed(0)
    return torch.rand(B, 1, 8, 8, generator=g) * 2 - 1, torch.randn(B, 1, 8, 8, generator=g), torch.tensor([1, 5, 19])


def test_a_bad_call_from_a_notebook_still_gets_the_clear_error():
    x0, eps, t = _batch()
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 20\)"):
        diffusion.q_sample(SCHEDULE, x0, torch.tensor([1, 5, 20]), eps)
    with pytest.raises(ValueError, match="xt and output must have the same shape"):
        diffusion.eps_and_x0(SCHEDULE, x0, t, eps[:2])
    with pytest.raises(ValueError, match=r"x0 must lie in \[-1, 1\], got values in \[0, 255\].*x / 127.5 - 1"):
        diffusion.q_sample(SCHEDULE, torch.linspace(0, 255, 192).reshape(3, 1, 8, 8), t, eps)
    zero = lambda xt, t: torch.zeros_like(xt)             # noqa: E731
    with pytest.raises(ValueError, match=r"x0 must lie in \[-1, 1\]"):
        diffusion.loss_simple(zero, SCHEDULE, (x0 + 1) * 127.5)
    with pytest.raises(ValueError, match="x0: need at least 1 images, got 0"):
        diffusion.loss_simple(zero, SCHEDULE, x0[:0])
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none', got 'sum'"):
        diffusion.loss_simple(zero, SCHEDULE, x0, reduction="sum")
    with pytest.raises(TypeError, match=r"eps must be a torch.Tensor of x0's shape \(3, 1, 8, 8\), got ndarray"):
        diffusion.q_sample(SCHEDULE, x0, t, eps.numpy())


def test_inside_a_door_nothing_is_checked_again(model, monkeypatch):
    """One check of t per door call: p_sample's eps_and_x0, eps_posterior_mean and q_posterior
    trust it; a whole DDPM run checks t only where the network checks its own input."""
    calls = []
    real = checks.check_timesteps
    counting = lambda *a, **k: calls.append(1) or real(*a, **k)     # noqa: E731
    monkeypatch.setattr(checks, "check_timesteps", counting)
    monkeypatch.setattr("ddpm_tutorial.unet.check_timesteps", counting)
    x0, eps, t = _batch()
    diffusion.p_sample(SCHEDULE, x0, t, eps, clip_x0=True)
    diffusion.loss_simple(lambda xt, t: torch.zeros_like(xt), SCHEDULE, x0, t, eps)
    assert len(calls) == 2
    calls.clear()
    sampling.ddpm_sample(model, SCHEDULE, n=2, progress=False)
    assert len(calls) == SCHEDULE.T                       # the network's own check, once per step
    assert not checks.inside_door()


def test_trusted_lets_arguments_through_and_unwinds_on_error():
    x0, eps, t = _batch()
    with checks.trusted():
        assert checks.inside_door()
        diffusion.q_sample(SCHEDULE, x0 * 10, t, eps)     # not looked at: the caller vouched for it
    assert not checks.inside_door()
    with pytest.raises(ValueError):
        diffusion.q_sample(SCHEDULE, x0 * 10, t, eps)
    assert not checks.inside_door()


@pytest.mark.parametrize("call, error, match", [
    (lambda m: sampling.sample(m, SCHEDULE, "ddim", n=2.5, steps=2), TypeError,
     r"n \(the number of samples\) must be an integer, got 2.5 \(float\)"),
    (lambda m: sampling.ddim_sample(m, SCHEDULE, n=2, steps=3.0), TypeError, r"steps must be an integer, got 3.0"),
    (lambda m: sampling.ddpm_sample(m, SCHEDULE, n="4"), TypeError, r"n \(the number of samples\) must be an integer"),
    (lambda m: sampling.dpm_solver_sample(m, SCHEDULE, n=2, steps=True), TypeError,
     "steps must be an integer, got True"),
    (lambda m: sampling.ddim_sample(m, SCHEDULE, n=2, steps=2, seed=1.5), TypeError, "seed must be an integer"),
    (lambda m: sampling.ddim_sample(m, SCHEDULE, n=2, steps=2, eta="1"), TypeError, "eta must be a number, got '1'"),
    (lambda m: sampling.ddim_sample(m, make_schedule("linear"), n=2, steps=2), ValueError,
     r"the model was trained with T = 20 diffusion steps but the schedule has T = 1000"),
    (lambda m: sampling.ddpm_sample(m, make_schedule("linear", T=10), n=2), ValueError, "T = 20 .* T = 10"),
])
def test_sample_refuses_wrong_types_naming_the_argument(model, call, error, match):
    with pytest.raises(error, match=match):
        call(model)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(title=3), TypeError, r"title must be a string or None, got 3 \(int\)"),
    (dict(width=3.0), TypeError, r"width must be a positive integer number of CSS pixels, got 3.0"),
    (dict(width=0), ValueError, "width must be a positive integer"),
    (dict(labels=None), TypeError, "labels must be a sequence of strings, one per frame, got NoneType"),
    (dict(frames=None), TypeError, r"frames must be a sequence of images .* got NoneType"),
])
def test_slider_html_refuses_wrong_types_naming_the_argument(kwargs, error, match):
    args = dict(frames=np.zeros((2, 4, 4)), labels=["a", "b"]) | kwargs
    with pytest.raises(error, match=match):
        slider_html(**args)


def test_check_int_and_number():
    assert checks.check_int(np.int64(3), "k", minimum=1) == 3
    for bad in (2.5, 3.0, True, "3", None):
        with pytest.raises(TypeError, match="k must be an integer"):
            checks.check_int(bad, "k")
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        checks.check_int(0, "k", minimum=1)
    assert checks.check_number(1, "w") == 1.0
    with pytest.raises(TypeError, match="w must be a number, got False"):
        checks.check_number(False, "w")
