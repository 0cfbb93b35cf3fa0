"""Settings: the presets build valid models, the one mode switch, and config errors."""
import pytest
import torch

import ddpm_tutorial.config as config
from ddpm_tutorial.config import (PRESET_NAMES, DiffusionConfig, ModelConfig, TrainConfig, get_preset,
                                  hardware_summary, is_quick, preset_name)
from ddpm_tutorial.schedules import NoiseSchedule
from ddpm_tutorial.unet import UNet, count_parameters


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_build_valid_models(name):
    preset = get_preset(name)
    assert preset.name == name
    torch.manual_seed(0)
    model = UNet(preset.model).eval()
    x = torch.randn(1, preset.model.in_channels, preset.model.image_size, preset.model.image_size)
    with torch.no_grad():
        assert model(x, torch.tensor([999])).shape == x.shape
    assert NoiseSchedule.from_config(preset.diffusion).T == preset.diffusion.T
    train = preset.train
    assert 0 <= train.warmup_steps < train.steps and 0 < preset.ddim_steps <= preset.diffusion.T
    assert preset.n_samples >= 1 and preset.n_metric >= preset.n_samples
    d = preset.to_dict()
    assert ModelConfig(**d["model"]) == preset.model and TrainConfig(**d["train"]) == preset.train


def test_preset_sizes_are_ordered():
    sizes = [count_parameters(UNet(get_preset(n).model)) for n in ("quick", "cpu", "gpu")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    assert get_preset("quick").train.steps < get_preset("cpu").train.steps


def test_get_preset_returns_a_fresh_copy():
    p = get_preset("quick")
    p.train.steps = 1
    p.model.base_channels = 4
    assert get_preset("quick").train.steps != 1 and get_preset("quick").model.base_channels != 4


@pytest.mark.parametrize("value, quick", [("1", True), ("true", True), ("YES", True), (" 1 ", True),
                                          ("0", False), ("", False), ("no", False)])
def test_ddpm_quick_switch(monkeypatch, value, quick):
    monkeypatch.setenv("DDPM_QUICK", value)
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: False)
    assert is_quick() is quick
    assert preset_name() == ("quick" if quick else "cpu")
    assert get_preset().name == preset_name()


def test_preset_follows_hardware(monkeypatch):
    monkeypatch.delenv("DDPM_QUICK", raising=False)
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: True)
    assert preset_name() == "gpu"
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: False)
    assert preset_name() == "cpu"
    assert hardware_summary("cpu").startswith("CPU ") and f"torch {torch.__version__}" in hardware_summary("cpu")


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'; expected one of \('quick', 'cpu', 'gpu'\)"):
        get_preset("huge")
    with pytest.raises(ValueError, match=r"schedule must be one of \('linear', 'cosine'\), got 'sigmoid'"):
        DiffusionConfig(schedule="sigmoid")
    with pytest.raises(ValueError, match="T must be >= 1, got 0"):
        DiffusionConfig(T=0)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"ema_decay must be in \[0, 1\), got {bad}"):
            TrainConfig(ema_decay=bad)
    with pytest.raises(ValueError, match="lr_decay must be 'constant' or 'cosine', got 'linear'"):
        TrainConfig(lr_decay="linear")
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1"):
        TrainConfig(batch_size=0)


def test_paper_defaults():
    d, m = DiffusionConfig(), ModelConfig()
    assert (d.T, d.schedule, d.beta_start, d.beta_end) == (1000, "linear", 1e-4, 0.02)
    assert m.skip == "pre" and m.widths == (32, 64, 64) and m.temb_dim == 128
    assert ModelConfig(time_embed_dim=33).temb_dim == 33
    assert ModelConfig(channel_mults=[1, 2]).channel_mults == (1, 2)       # lists become tuples
