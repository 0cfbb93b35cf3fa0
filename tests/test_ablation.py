"""The ablation helpers of chapter 6: fair variants, honest summaries."""
from __future__ import annotations

import math

import pytest
import torch

from ddpm_tutorial import ablation
from ddpm_tutorial.config import ModelConfig
from ddpm_tutorial.schedules import make_schedule
from ddpm_tutorial.unet import UNet, count_parameters


def test_variants_differ_only_in_skips_and_the_widened_one_matches_parameters():
    base = ModelConfig()
    variants = ablation.variant_configs(base)
    assert list(variants) == ["pre", "post", "none", "none (widened)"]
    counts = {name: count_parameters(UNet(cfg)) for name, cfg in variants.items()}
    assert counts["pre"] == counts["post"] > counts["none"]
    assert abs(counts["none (widened)"] - counts["pre"]) / counts["pre"] < 0.03
    wide = variants["none (widened)"]
    assert wide.skip is None and wide.temb_dim == base.temb_dim and wide.sinusoid_dim == base.sinusoid_dim
    assert all(w_wide >= w for w_wide, w in zip(wide.widths, base.widths))


def test_summarize_reports_mean_and_sample_std_over_seeds():
    results = [{"variant": "pre", "seed": s, "params": 10, "loss": [1.0] * 50 + [v] * 100, "fd": fd,
                "confidence": 0.9, "class_spread": 0.8}
               for s, (v, fd) in enumerate([(0.1, 2.0), (0.2, 4.0), (0.3, 6.0)])]
    (row,) = ablation.summarize(results)
    assert row["seeds"] == 3 and row["params"] == 10
    assert row["final_loss"] == pytest.approx(0.2) and row["final_loss_std"] == pytest.approx(0.1)
    assert row["fd"] == pytest.approx(4.0) and row["fd_std"] == pytest.approx(2.0)
    single = ablation.summarize(results[:1])[0]
    assert math.isnan(single["fd_std"])


def test_denoising_probe_uses_the_same_noise_for_every_model():
    schedule = make_schedule("linear", T=1000)
    zero = UNet(ModelConfig(base_channels=8, channel_mults=(1, 2)))
    for p in zero.parameters():
        torch.nn.init.zeros_(p)                       # predicts eps = 0 everywhere
    x0 = torch.rand(2, 1, 28, 28) * 2 - 1
    probe = ablation.denoising_probe({"a": zero, "b": zero}, schedule, x0, [10, 500])
    for t in (10, 500):
        torch.testing.assert_close(probe["a"][t], probe["b"][t])
        # with eps_theta = 0, x0_hat = x_t / sqrt(alpha_bar_t)
        expected = (probe["x_t"][t] / schedule.sqrt_alpha_bar[t]).clamp(-1, 1)
        torch.testing.assert_close(probe["a"][t], expected)


@pytest.mark.slow
def test_run_variant_trains_samples_and_scores(tmp_path):
    settings = ablation.settings_for("quick")
    settings.steps, settings.n_samples, settings.ddim_steps = 3, 64, 2
    data = torch.rand(64, 1, 28, 28) * 2 - 1
    cfg = ModelConfig(base_channels=8, channel_mults=(1, 2))
    result = ablation.run_variant("pre", cfg, 0, settings, data)
    assert len(result["loss"]) == 3 and result["samples"].shape == (16, 1, 28, 28)
    assert result["fd_real"] < result["fd_noise"] and result["fd"] > 0


def test_settings_are_pinned_to_what_chapter_6_ran():
    """Chapter 6's committed results used these networks; a preset change must not move them."""
    assert ablation.settings_for("cpu").model.widths == (16, 32, 32)
    assert ablation.settings_for("cpu").steps == 400
    assert ablation.settings_for("gpu").model.widths == (32, 64, 64)
