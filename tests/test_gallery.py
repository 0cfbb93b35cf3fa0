"""tools/gallery.py, the gallery of broken runs: each mistake breaks the one line it names, the
quick settings produce every figure and every number from the runs, and a second call reuses
the cache instead of training again."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ddpm_tutorial import diffusion
from ddpm_tutorial.config import DiffusionConfig, ModelConfig
from ddpm_tutorial.schedules import NoiseSchedule, make_schedule

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = ("data_range", "no_sqrt", "lr_10x", "skip_post", "no_ema", "sign_flip", "t_plus_one", "no_clamp",
           "train_mode", "garbage")
SNIPPETS = ("healthy", "data_range", "no_sqrt", "lr_10x", "skip_post", "no_ema", "sign_flip", "t_plus_one",
            "no_clamp", "train_mode", "garbage_rate", "garbage_what")


def _tool():
    spec = importlib.util.spec_from_file_location("gallery_tool", ROOT / "tools" / "gallery.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gallery_tool"] = module
    spec.loader.exec_module(module)
    return module


gallery = _tool()


# --- each mistake breaks its line, and only that -------------------------------------------

def test_eq4_without_square_roots_drops_both_roots_in_q_sample():
    class FakeTrainer:
        schedule = make_schedule("linear", T=50)
    trainer = FakeTrainer()
    gallery.eq4_without_square_roots(trainer)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1, torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([0, 20, 49])
    ab = FakeTrainer.schedule.alpha_bar[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion.q_sample(trainer.schedule, x0, t, eps), ab * x0 + (1 - ab) * eps)
    torch.testing.assert_close(trainer.schedule.beta, FakeTrainer.schedule.beta)     # nothing else changed


def test_data_left_in_unit_range():
    class FakeTrainer:
        data = torch.tensor([-1.0, 0.0, 1.0])
    trainer = FakeTrainer()
    gallery.data_left_in_unit_range(trainer)
    torch.testing.assert_close(trainer.data, torch.tensor([0.0, 0.5, 1.0]))


def test_config_mistakes_change_one_field():
    model, train = gallery.settings_for(True).model, gallery.settings_for(True).train
    m, tr = gallery.learning_rate_10x(model, train)
    assert m == model and tr.lr == pytest.approx(10 * train.lr) and tr.steps == train.steps
    m, tr = gallery.skips_after_downsampling(model, train)
    assert m.skip == "post" and tr == train and m.widths == model.widths


def test_sign_flipped_step_adds_the_predicted_noise():
    schedule = make_schedule("linear", T=50)
    g = torch.Generator().manual_seed(1)
    xt, eps, z = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([30, 30])
    x_prev, _ = gallery.p_sample_noise_sign_flipped(schedule, xt, t, eps, z)
    beta, alpha, ab = schedule.beta[30], schedule.alpha[30], schedule.alpha_bar[30]
    expected = (xt + beta / (1 - ab).sqrt() * eps) / alpha.sqrt() + beta.sqrt() * z
    torch.testing.assert_close(x_prev, expected)
    right, _ = diffusion.p_sample(schedule, xt, t, eps, z)
    assert not torch.allclose(x_prev, right)


class _Recorder(nn.Module):
    """A network that records the timesteps it is asked about and predicts eps = 0."""

    def __init__(self, T=50):
        super().__init__()
        self.T, self.config, self.seen = T, ModelConfig(image_size=4, base_channels=8, channel_mults=(1,)), []
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        if int(t.max()) >= self.T:
            raise ValueError(f"timesteps must lie in [0, {self.T})")
        self.seen.append(int(t[0]))
        return x * self.w


def test_network_told_t_plus_one_sees_t_plus_one_and_t_equal_T():
    net = _Recorder(T=50)
    wrapped = gallery.NetworkToldTPlusOne(net)
    wrapped(torch.zeros(1, 1, 4, 4), torch.tensor([49]))        # the original's check would refuse t = 50
    wrapped(torch.zeros(1, 1, 4, 4), torch.tensor([0]))
    assert wrapped.net.seen == [50, 1] and net.seen == [] and net.T == 50


def test_train_mode_wrapper_and_mode_dependent_modules():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Dropout(0.0), nn.Dropout(0.1), nn.GroupNorm(1, 2))
    assert gallery.mode_dependent_modules(net) == ["1", "3"]       # batch norm, dropout with p > 0
    unet = gallery.UNet(ModelConfig(base_channels=8, channel_mults=(1, 2)))
    assert gallery.mode_dependent_modules(unet) == []               # GroupNorm, dropout 0: nothing
    class TakesT(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.config = net, None

        def forward(self, x, t):
            return self.net(x)
    inner = TakesT()
    wrapper = gallery.NetworkInTrainMode(inner)
    wrapper.eval()                                                  # what the sampler does
    assert not net.training
    wrapper(torch.randn(4, 1, 3, 3), torch.zeros(4, dtype=torch.long))
    assert net.training                                             # the mistake: forward undoes it


def test_writing_without_the_clamp_wraps_around():
    x = torch.tensor([-1.01, -1.0, 0.0, 1.0, 1.01]).view(1, 1, 1, 5)
    assert gallery.png_bytes_without_clamp(x).flatten().tolist() == [255, 0, 128, 255, 0]
    assert gallery.png_bytes(x).flatten().tolist() == [0, 0, 128, 255, 255]


# --- the measures --------------------------------------------------------------------------

def test_foreground_texture():
    flat = torch.full((1, 1, 8, 8), 0.5)
    checker = (torch.arange(64).view(8, 8) + torch.arange(8).view(8, 1)) % 2 * 1.6 - 0.6   # 1.0 / -0.6
    assert gallery.foreground_texture(flat).item() == 0.0
    assert gallery.foreground_texture(torch.full((1, 1, 8, 8), -1.0)).item() == 0.0     # background only
    assert gallery.foreground_texture(checker.view(1, 1, 8, 8)).item() == pytest.approx(0.8)


def test_noise_imprint():
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(64, 1, 16, 16, generator=g)
    smooth = torch.zeros(64, 1, 16, 16)
    assert gallery.noise_imprint(x_T.clone(), x_T).min().item() == pytest.approx(1.0, abs=1e-5)
    assert abs(gallery.noise_imprint(torch.randn(64, 1, 16, 16, generator=g), x_T).mean().item()) < 0.05
    assert gallery.noise_imprint(smooth, x_T).abs().max().item() == 0.0


def test_wilson_interval():
    lo, hi = gallery.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = gallery.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)


# --- the whole gallery in quick mode -------------------------------------------------------

@pytest.fixture(scope="module")
def quick_gallery(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DDPM_QUICK", "1")
    out, cache = tmp_path_factory.mktemp("gallery"), tmp_path_factory.mktemp("runs") / "gallery_quick.pt"
    try:
        assert gallery.main(["--out", str(out), "--cache", str(cache)]) == 0
    finally:
        mp.undo()
    return out, cache


def test_quick_gallery_writes_every_figure_and_snippet(quick_gallery):
    out, _ = quick_gallery
    for name in ENTRIES:
        png = out / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in SNIPPETS:
        assert (out / f"{name}.md").read_text().strip(), name
    assert "quick settings" in (out / "run.md").read_text()


def test_quick_gallery_numbers_come_from_the_runs(quick_gallery):
    out, cache = quick_gallery
    nums = json.loads((out / "numbers.json").read_text())
    items = gallery.load_checkpoint_dict(cache)["items"]
    loss = items["train/healthy"]["loss"]
    assert nums["healthy"]["final_loss"] == pytest.approx(sum(loss[-100:]) / len(loss[-100:]))
    assert nums["data_range"]["fd"] == pytest.approx(items["ddim/data_range"]["quality"]["fd"])
    assert f"{nums['data_range']['fd']:.1f}" in (out / "data_range.md").read_text()
    assert f"{nums['healthy']['final_loss']:.4f}" in (out / "data_range.md").read_text()
    flip = items["ddpm/sign_flip"]["raw"]
    assert nums["sign_flip"]["max_abs"] == pytest.approx(flip.abs().max().item())
    assert nums["train_mode"]["max_diff"] == 0.0                    # GroupNorm and dropout 0: modes agree
    raw = items["ddpm/healthy"]["raw"]
    assert nums["no_clamp"]["ddpm"]["outside"] == pytest.approx((raw.abs() > 1).float().mean().item())
    g = nums["garbage"]
    assert g["ddim_eta0"]["n"] == gallery.settings_for(True).n_garbage
    assert 0 <= g["ddim_eta0"]["ci"][0] <= g["ddim_eta0"]["rate"] <= g["ddim_eta0"]["ci"][1] <= 1
    z = nums["settings"]["z"]
    assert z == pytest.approx(gallery.statistics.NormalDist().inv_cdf(1 - 0.025 / nums["settings"]["n_fd"]))


def test_quick_gallery_reuses_its_cache(quick_gallery):
    out, cache = quick_gallery
    settings = gallery.settings_for(True)
    again = gallery.Cache(cache, gallery.cache_key(settings))
    gallery.run_all(settings, again, log=lambda msg: None)
    assert again.computed == []                                     # nothing trained or sampled again
    other = gallery.Cache(cache, {**gallery.cache_key(settings), "n_score": 17})
    assert other.items == {}                                        # other settings: nothing reused


def test_gallery_page_includes_every_snippet_and_types_no_measured_number():
    page = ROOT / "book" / "gallery.md"
    if not page.exists():
        pytest.skip("book/gallery.md not written yet")
    text = page.read_text()
    for name in SNIPPETS + ("run",):
        assert f"gallery/{name}.md" in text, name
    for name in ENTRIES:
        assert f"gallery/{name}.png" in text, name
        assert (ROOT / "book" / "gallery" / f"{name}.png").is_file(), name
    prose = re.sub(r"```.*?```", "", text, flags=re.S)              # code blocks and inline code may hold
    prose = re.sub(r"`[^`]*`|\$[^$]*\$", "", prose)                 # code, math its constants
    prose = re.sub(r"Exercise \d+\.\d+", "", prose)
    typed = re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])|\d+ ?%", prose)
    assert not typed, f"numbers typed into the gallery page instead of generated: {typed}"
