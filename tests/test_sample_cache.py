"""sample_cache.sample_set: a set is made once, read back when everything that decides its pixels
is the same, and made again when anything is not (a setting, x_T, the weights, or the sampler's
numbers, which the probe catches)."""
import pytest
import torch

from ddpm_tutorial import sample_cache
from ddpm_tutorial.config import ModelConfig
from ddpm_tutorial.sampling import ddpm_sample, sample
from ddpm_tutorial.schedules import make_schedule
from ddpm_tutorial.unet import UNet

SCHEDULE = make_schedule("linear", T=12, beta_start=1e-3, beta_end=0.3)
CFG = ModelConfig(image_size=8, base_channels=8, channel_mults=(1, 2), groups=4)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return UNet(CFG, T=SCHEDULE.T).eval()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_SAMPLE_CACHE", str(tmp_path / "samples"))
    return tmp_path / "samples"


def x_T(n=5, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_made_once_then_read_back(model, cache):
    first = sample_cache.sample_set(model, SCHEDULE, x_T(), "ddim", chunk=2, steps=4, eta=1.0)
    assert not first.cached and first.seconds > 0 and first.images.shape == (5, 1, 8, 8)
    assert len(list(cache.glob("*.pt"))) == 1
    again = sample_cache.sample_set(model, SCHEDULE, x_T(), "ddim", chunk=2, steps=4, eta=1.0)
    assert again.cached and again.seconds == first.seconds and again.made_on == first.made_on
    assert torch.equal(again.images, first.images) and torch.equal(again.raw, first.raw)


def test_chunks_are_seeded_by_their_index(model):
    got = sample_cache.sample_set(model, SCHEDULE, x_T(), "ddpm", chunk=2)
    parts = [ddpm_sample(model, SCHEDULE, n=len(x), x_T=x, seed=i, progress=False)
             for i, x in enumerate(x_T().split(2))]
    assert torch.equal(got.images, torch.cat([p.images for p in parts]))


@pytest.mark.parametrize("change", ["setting", "x_T", "weights", "chunk"])
def test_anything_that_decides_the_pixels_makes_a_new_set(model, cache, change):
    sample_cache.sample_set(model, SCHEDULE, x_T(), "ddim", chunk=2, steps=4, eta=1.0)
    kwargs = dict(chunk=2, steps=4, eta=1.0)
    start = x_T()
    if change == "setting":
        kwargs["eta"] = 0.5
    elif change == "x_T":
        start = x_T(seed=1)
    elif change == "chunk":
        kwargs["chunk"] = 3
    else:
        with torch.no_grad():
            next(model.parameters()).add_(0.1)
    assert not sample_cache.sample_set(model, SCHEDULE, start, "ddim", **kwargs).cached
    assert len(list(cache.glob("*.pt"))) == 2


def test_a_sampler_whose_numbers_changed_fails_the_probe(model, monkeypatch):
    made = sample_cache.sample_set(model, SCHEDULE, x_T(), "ddim", chunk=2, steps=4)

    def changed(*args, **kwargs):                     # the package's sampler, computing something else
        out = sample(*args, **kwargs)
        out.images = (out.images + 0.01).clamp(-1, 1)
        return out

    monkeypatch.setattr(sample_cache, "sample", changed)
    again = sample_cache.sample_set(model, SCHEDULE, x_T(), "ddim", chunk=2, steps=4)
    assert not again.cached and not torch.equal(again.images, made.images)


def test_off_disables_the_cache(model, cache, monkeypatch):
    monkeypatch.setenv("DDPM_SAMPLE_CACHE", "off")
    sample_cache.sample_set(model, SCHEDULE, x_T(), "ddim", chunk=2, steps=4)
    assert not sample_cache.sample_set(model, SCHEDULE, x_T(), "ddim", chunk=2, steps=4).cached
    assert not cache.exists()


def test_refuses_a_batch_of_the_wrong_rank(model):
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        sample_cache.sample_set(model, SCHEDULE, x_T()[0], "ddim", steps=4)
