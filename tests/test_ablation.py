"""The ablation helpers of chapter 7: fair variants, one budget from the preset, a cache that
retrains nothing it has, and honest summaries."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from ddpm_tutorial import ablation
from ddpm_tutorial.config import AblationConfig, ModelConfig, TrainConfig, get_preset
from ddpm_tutorial.sampling import ddim_sample
from ddpm_tutorial.schedules import make_schedule
from ddpm_tutorial.unet import UNet, count_parameters


def _settings(**kw) -> AblationConfig:
    base = dict(model=ModelConfig(), train=TrainConfig(), variants=("pre", "post", "none", "none (widened)"))
    base.update(kw)
    return AblationConfig(**base)


def test_variants_differ_only_in_skips_and_the_widened_one_matches_parameters():
    settings = _settings()
    variants = ablation.variant_configs(settings)
    assert list(variants) == ["pre", "post", "none", "none (widened)"]
    for name in ("pre", "post", "none"):
        assert variants[name] == dataclasses.replace(settings.model, skip=name)
    counts = {name: count_parameters(UNet(cfg)) for name, cfg in variants.items()}
    assert counts["pre"] == counts["post"] > counts["none"]
    assert abs(counts["none (widened)"] - counts["pre"]) / counts["pre"] < 0.03
    wide = variants["none (widened)"]
    base = settings.model
    assert wide.skip == "none" and wide.temb_dim == base.temb_dim and wide.sinusoid_dim == base.sinusoid_dim
    assert all(w_wide >= w for w_wide, w in zip(wide.widths, base.widths))


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match=r"skip must be one of \('pre', 'post', 'none'\), got 'mid'"):
        ablation.variant_configs(_settings(variants=("pre", "mid")))


@pytest.mark.parametrize("name", ["quick", "cpu", "gpu"])
def test_each_preset_variant_is_its_ablation_model_with_another_skip(name):
    settings = get_preset(name).ablation
    variants = ablation.variant_configs(settings)
    assert list(variants) == list(settings.variants)
    for variant, cfg in variants.items():
        if variant != "none (widened)":
            assert dataclasses.replace(cfg, skip=settings.model.skip) == settings.model


def _result(variant, seed, fd, fd_std=1.0, loss_value=0.1, confidence=0.9, class_spread=0.8):
    return {"variant": variant, "seed": seed, "params": 10, "loss": [1.0] * 50 + [loss_value] * 100,
            "quality": {"fd": fd, "fd_std": fd_std, "confidence": confidence, "class_spread": class_spread}}


def test_summarize_reports_mean_and_sample_std_over_seeds():
    results = [_result("pre", s, fd, fd_std=0.5 * (s + 1), loss_value=v)
               for s, (v, fd) in enumerate([(0.1, 2.0), (0.2, 4.0), (0.3, 6.0)])]
    (row,) = ablation.summarize(results)
    assert row["variant"] == "pre" and row["seeds"] == 3 and row["params"] == 10
    assert row["final_loss"] == pytest.approx(0.2) and row["final_loss_std"] == pytest.approx(0.1)
    assert row["fd"] == pytest.approx(4.0) and row["fd_std"] == pytest.approx(2.0)
    assert row["fd_boot"] == pytest.approx(1.0)                   # mean of the bootstrap spreads 0.5, 1, 1.5
    assert row["confidence"] == pytest.approx(0.9) and row["confidence_std"] == pytest.approx(0.0)
    single = ablation.summarize(results[:1])[0]
    assert math.isnan(single["fd_std"])
    # variants keep their first-seen order
    mixed = [_result("post", 0, 9.0), _result("pre", 0, 1.0), _result("post", 1, 11.0)]
    assert [r["variant"] for r in ablation.summarize(mixed)] == ["post", "pre"]


def test_compare_uses_the_seeds_standard_error_and_welchs_critical_value():
    rows = ablation.summarize([_result("pre", s, fd) for s, fd in enumerate([10.0, 12.0, 14.0])]
                              + [_result("post", s, fd) for s, fd in enumerate([20.0, 22.0, 24.0])])
    out = ablation.compare(rows, "post", "pre", "fd")
    assert out["diff"] == pytest.approx(10.0)
    assert out["se"] == pytest.approx(math.sqrt((4 + 4) / 3))       # sample std 2 on each side, 3 seeds
    assert out["df"] == pytest.approx(4.0)                           # equal spreads: 2 (n - 1)
    assert out["t_crit"] == pytest.approx(2.776445, abs=1e-5)
    assert out["t"] == pytest.approx(10.0 / math.sqrt(8 / 3))
    assert out["significant"] is True
    assert ablation.compare(rows, "post", "pre", "fd", level=0.9999)["significant"] is False
    one_seed = ablation.summarize([_result("pre", 0, 1.0), _result("post", 0, 100.0)])
    assert ablation.compare(one_seed, "post", "pre", "fd")["significant"] is False   # no spread, no claim


def test_compare_needs_the_t_value_not_two_standard_errors():
    """A difference of 2.5 standard errors with three seeds a side: beyond the normal's 2, short
    of Student's 2.78 at 4 degrees of freedom, so it is not called a difference."""
    pre = [10.0, 12.0, 14.0]                                          # std 2 on both sides: se = sqrt(8/3)
    gap = 2.5 * math.sqrt(8 / 3)
    rows = ablation.summarize([_result("pre", s, fd) for s, fd in enumerate(pre)]
                              + [_result("post", s, fd + gap) for s, fd in enumerate(pre)])
    out = ablation.compare(rows, "post", "pre", "fd")
    assert out["t"] == pytest.approx(2.5) and out["significant"] is False


def test_compare_with_unequal_spreads_uses_welch_satterthwaite():
    rows = ablation.summarize([_result("pre", s, fd) for s, fd in enumerate([10.0, 10.0, 10.0])]
                              + [_result("post", s, fd) for s, fd in enumerate([20.0, 22.0, 24.0])])
    out = ablation.compare(rows, "post", "pre", "fd")
    assert out["df"] == pytest.approx(2.0)                           # one side without spread: n - 1
    assert out["t_crit"] == pytest.approx(4.302653, abs=1e-5)
    assert ablation.welch_df(1.0, 4, 3.0, 9) == pytest.approx((1 / 4 + 1) ** 2 / ((1 / 4) ** 2 / 3 + 1 / 8))


@pytest.mark.parametrize("df, level, expected", [(1, 0.95, 12.706205), (2, 0.95, 4.302653), (4, 0.95, 2.776445),
                                                 (10, 0.95, 2.228139), (30, 0.99, 2.749996), (1e7, 0.95, 1.959964)])
def test_t_critical_matches_tables(df, level, expected):
    assert ablation.t_critical(df, level) == pytest.approx(expected, abs=2e-6)


def test_t_critical_between_integer_df():
    assert ablation.t_critical(5) < ablation.t_critical(4.5) < ablation.t_critical(4)


def test_student_t_cdf():
    assert ablation.student_t_cdf(0.0, 3) == pytest.approx(0.5)
    assert ablation.student_t_cdf(1.0, 1) == pytest.approx(0.75)      # Cauchy: 1/2 + atan(1)/pi
    assert ablation.student_t_cdf(-2.0, 5) == pytest.approx(1 - ablation.student_t_cdf(2.0, 5))
    with pytest.raises(ValueError, match="degrees of freedom must be > 0"):
        ablation.t_critical(0)


def test_mean_std():
    assert ablation.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, std = ablation.mean_std([5])
    assert mean == 5.0 and math.isnan(std)


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


def test_loss_by_t_fixes_images_and_noise():
    schedule = make_schedule("linear", T=1000)
    zero = UNet(ModelConfig(base_channels=8, channel_mults=(1, 2)))
    for p in zero.parameters():
        torch.nn.init.zeros_(p)
    x0 = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = ablation.loss_by_t(zero, schedule, x0, [0, 500, 999], seed=4)
    assert list(out) == [0, 500, 999]
    g = torch.Generator().manual_seed(4)                 # with eps_theta = 0 the loss is mean(eps^2)
    for t in (0, 500, 999):
        assert out[t] == pytest.approx(torch.randn(x0.shape, generator=g).pow(2).mean().item(), rel=1e-6)
    assert ablation.loss_by_t(zero, schedule, x0, [0, 500, 999], seed=4) == out


def test_cache_path():
    assert ablation.cache_path(get_preset("cpu")) == Path("runs") / "ablation_cpu.pt"


def _tiny_ablation_preset(**ablation_fields):
    quick = get_preset("quick")
    fields = dict(model=ModelConfig(base_channels=8, channel_mults=(1, 2)), seeds=(0, 1),
                  variants=("pre", "post"), train=dataclasses.replace(quick.ablation.train, steps=2))
    fields.update(ablation_fields)
    return dataclasses.replace(quick, ablation=dataclasses.replace(quick.ablation, **fields))


def test_cache_key_ignores_fields_at_their_default_so_new_fields_keep_old_runs():
    """A key stored in full by an older version (every field, one field that no longer exists
    at a non-default value aside) matches when only defaults differ, and not when a value does."""
    preset = get_preset("cpu")
    key = ablation.cache_key(preset)
    stored = ablation.as_stored({"ablation": {k: v for k, v in dataclasses.asdict(preset.ablation).items()
                                           if k not in ("seeds", "variants")},
                              "diffusion": dataclasses.asdict(preset.diffusion)})
    assert ablation._canonical(stored) == key
    del stored["ablation"]["train"]["p_uncond"]            # a field the older version did not have
    assert ablation._canonical(stored) == key
    stored["ablation"]["train"]["lr"] = 3e-3                # another recipe: another key
    assert ablation._canonical(stored) != key
    assert key["ablation"]["train"]["steps"] == preset.ablation.train.steps   # non-defaults are kept


def test_run_ablation_caches_finished_runs(tmp_path, monkeypatch):
    calls = []

    def fake_run_variant(preset, name, cfg, seed, data, device=None, progress=False):
        calls.append((name, seed))
        return {"variant": name, "seed": seed, "loss": [float(seed)], "samples": torch.zeros(1, 1, 28, 28)}

    monkeypatch.setattr(ablation, "run_variant", fake_run_variant)
    preset, cache, data = _tiny_ablation_preset(), tmp_path / "runs" / "ab.pt", torch.zeros(4, 1, 28, 28)
    first = ablation.run_ablation(preset, data, cache=cache, progress=False)
    assert calls == [("pre", 0), ("post", 0), ("pre", 1), ("post", 1)]   # seed-major: every variant per seed
    assert [(r["variant"], r["seed"]) for r in first] == calls and cache.exists()

    again = ablation.run_ablation(preset, data, cache=cache, progress=False)
    assert len(calls) == 4                                                 # nothing retrained
    assert [(r["variant"], r["seed"]) for r in again] == [(r["variant"], r["seed"]) for r in first]

    more_seeds = _tiny_ablation_preset(seeds=(0, 1, 2))                    # one more seed: only its runs
    ablation.run_ablation(more_seeds, data, cache=cache, progress=False)
    assert calls[4:] == [("pre", 2), ("post", 2)]

    other = dataclasses.replace(preset, ablation=dataclasses.replace(
        preset.ablation, train=dataclasses.replace(preset.ablation.train, lr=preset.ablation.train.lr / 2)))
    ablation.run_ablation(other, data, cache=cache, progress=False)        # another recipe: a new key
    assert calls[6:] == [("pre", 0), ("post", 0), ("pre", 1), ("post", 1)]

    ablation.run_ablation(preset, data, progress=False)                   # no cache: always trains
    assert len(calls) == 14


def test_run_ablation_resumes_an_interrupted_run(tmp_path, monkeypatch):
    calls = []

    def flaky(preset, name, cfg, seed, data, device=None, progress=False):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append((name, seed))
        return {"variant": name, "seed": seed}

    monkeypatch.setattr(ablation, "run_variant", flaky)
    preset, cache, data = _tiny_ablation_preset(), tmp_path / "ab.pt", torch.zeros(4, 1, 28, 28)
    with pytest.raises(KeyboardInterrupt):
        ablation.run_ablation(preset, data, cache=cache, progress=False)
    calls.append("resumed")
    monkeypatch.setattr(ablation, "run_variant",
                        lambda preset, name, cfg, seed, *a, **k: calls.append((name, seed)) or {"variant": name,
                                                                                             "seed": seed})
    results = ablation.run_ablation(preset, data, cache=cache, progress=False)
    assert calls == [("pre", 0), ("post", 0), "resumed", ("pre", 1), ("post", 1)]
    assert len(results) == 4


@pytest.mark.slow
def test_run_variant_trains_samples_and_scores(tiny_images):
    """One variant, one seed, on the preset's ablation budget: a 3-step network's samples are
    told apart from real images (FD far above the floor, beyond the spreads), and the stored
    EMA weights reproduce the stored samples from the seeded x_T."""
    preset = _tiny_ablation_preset(train=dataclasses.replace(get_preset("quick").ablation.train, steps=3),
                                   n_samples=64, ddim_steps=2)
    data = tiny_images(64, size=28)
    cfg = ablation.variant_configs(preset.ablation)["post"]
    result = ablation.run_variant(preset, "post", cfg, 1, data)
    assert result["variant"] == "post" and result["seed"] == 1 and len(result["loss"]) == 3
    assert result["params"] == count_parameters(UNet(cfg)) and result["config"]["skip"] == "post"
    q = result["quality"]
    assert q["n"] == 64 and q["fd"] - q["fd_real"] > 3 * math.hypot(q["fd_std"], q["fd_real_std"])
    assert result["samples"].shape == (16, 1, 28, 28)
    model = ablation.model_of(result)
    assert model.config == cfg and not model.training
    again = ddim_sample(model, make_schedule("linear"), n=64, steps=2, seed=10_000 + 1, progress=False).images
    torch.testing.assert_close(again[:16], result["samples"])
