"""Settings: one frozen PRESETS table, the one mode switch, config errors, and run info."""
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

import ddpm_tutorial.config as config
from ddpm_tutorial import runinfo
from ddpm_tutorial.config import (PRESETS, AblationConfig, DiffusionConfig, ModelConfig, Preset, TrainConfig,
                                  default_device, get_preset, is_quick, preset_name, resolve_device)
from ddpm_tutorial.schedules import NoiseSchedule
from ddpm_tutorial.unet import UNet, count_parameters

ROOT = Path(__file__).resolve().parents[1]
NAMES = tuple(PRESETS)
# What the chapters read from a preset besides its model/diffusion/train configs.
CHAPTER_KNOBS = ("n_samples", "n_metric", "n_metric_slow", "n_bootstrap", "ddim_steps", "ddim_sweep", "eta_sweep",
                 "n_chains", "slider_frames", "guidance_scales")


@pytest.mark.parametrize("name", NAMES)
def test_presets_build_valid_models(name):
    preset = get_preset(name)
    assert preset.name == name
    torch.manual_seed(0)
    model = UNet(preset.model, T=preset.diffusion.T).eval()
    x = torch.randn(1, preset.model.in_channels, preset.model.image_size, preset.model.image_size)
    with torch.no_grad():
        assert model(x, torch.tensor([preset.diffusion.T - 1])).shape == x.shape
    assert NoiseSchedule.from_config(preset.diffusion).T == preset.diffusion.T
    train = preset.train
    assert 0 <= train.warmup_steps < train.steps and 0 < preset.ddim_steps <= preset.diffusion.T
    assert preset.n_samples >= 1 and preset.n_metric >= preset.n_samples
    d = preset.to_dict()
    assert ModelConfig(**d["model"]) == preset.model and TrainConfig(**d["train"]) == preset.train
    json.dumps(d)                                     # plain data: printable, storable in a checkpoint


def test_preset_names_come_from_the_table():
    assert NAMES == ("quick", "cpu", "gpu", "cifar", "rgb64")
    assert not hasattr(config, "PRESET_NAMES")        # one list of names: the table's keys
    for name, preset in PRESETS.items():
        assert preset.name == name and get_preset(name) is preset
    with pytest.raises(ValueError, match=r"unknown preset 'huge'; expected one of \('quick', 'cpu', 'gpu', 'cifar', 'rgb64'\)"):
        get_preset("huge")


def test_preset_sizes_are_ordered():
    sizes = [count_parameters(UNet(get_preset(n).model)) for n in ("quick", "cpu", "gpu")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    assert get_preset("quick").train.steps < get_preset("cpu").train.steps


# --- frozen ------------------------------------------------------------------------------

@pytest.mark.parametrize("obj, field", [
    (lambda p: p, "name"), (lambda p: p, "n_samples"), (lambda p: p.model, "base_channels"),
    (lambda p: p.train, "steps"), (lambda p: p.diffusion, "T"), (lambda p: p.ablation, "seeds"),
    (lambda p: p.ablation.train, "steps"), (lambda p: p.ablation.model, "skip")])
def test_presets_are_frozen(obj, field):
    target = obj(get_preset("quick"))
    before = getattr(target, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(target, field, 1)
    assert getattr(obj(get_preset("quick")), field) == before


def test_replace_derives_a_variant_and_validates():
    p = get_preset("quick")
    shorter = dataclasses.replace(p.train, steps=7)
    assert shorter.steps == 7 and shorter.lr == p.train.lr and p.train.steps == 30   # the preset is untouched
    variant = dataclasses.replace(p, train=shorter)
    assert variant.train.steps == 7 and get_preset("quick").train.steps == 30
    # replace runs __post_init__: an invalid variant cannot be made
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        dataclasses.replace(p.train, steps=0)
    with pytest.raises(ValueError, match=r"skip must be one of \('pre', 'post', 'none'\), got 'mid'"):
        dataclasses.replace(p.model, skip="mid")
    with pytest.raises(ValueError, match="T must be an integer >= 1, got 0"):
        dataclasses.replace(p.diffusion, T=0)


def test_skip_none_is_normalised_for_old_checkpoints():
    assert ModelConfig(skip=None).skip == "none"
    assert ModelConfig(skip=None) == ModelConfig(skip="none")
    assert dataclasses.replace(ModelConfig(), skip=None).skip == "none"
    assert ModelConfig(channel_mults=[1, 2]).channel_mults == (1, 2)       # lists become tuples


# --- every chapter knob in the preset --------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_every_chapter_knob_is_in_the_preset(name):
    p = get_preset(name)
    for knob in CHAPTER_KNOBS:
        assert hasattr(p, knob), f"preset {name!r} lacks {knob}"
    T = p.diffusion.T
    assert 1 <= p.n_samples <= p.n_metric and p.n_bootstrap >= 2 and p.n_chains >= 2 and p.slider_frames >= 2
    assert 2 <= p.n_metric_slow <= p.n_metric          # 06 scores the 1000-call extras against DDPM's first n
    assert all(1 <= s <= T for s in (p.ddim_steps, *p.ddim_sweep)) and list(p.ddim_sweep) == sorted(p.ddim_sweep)
    assert all(0.0 <= eta <= 1.0 for eta in p.eta_sweep) and 0.0 in p.eta_sweep
    assert all(w >= 0 for w in p.guidance_scales) and 0.0 in p.guidance_scales   # w = 0: no guidance, the baseline
    # the ablation's settings are whole configs, not copies of their fields
    ab = p.ablation
    assert isinstance(ab, AblationConfig)
    assert isinstance(ab.model, ModelConfig) and isinstance(ab.train, TrainConfig)
    assert set(ab.variants) <= {"pre", "post", "none", "none (widened)"} and len(ab.seeds) >= 2
    assert 2 <= ab.n_samples and 1 <= ab.ddim_steps <= T


def test_quick_preset_is_the_cheapest_everywhere():
    quick, cpu = get_preset("quick"), get_preset("cpu")
    for knob in ("n_samples", "n_metric", "n_metric_slow", "n_bootstrap", "ddim_steps", "n_chains", "slider_frames"):
        assert getattr(quick, knob) <= getattr(cpu, knob), knob
    for sweep in ("ddim_sweep", "eta_sweep", "guidance_scales"):
        assert len(getattr(quick, sweep)) <= len(getattr(cpu, sweep)), sweep
    assert quick.ablation.train.steps < cpu.ablation.train.steps
    assert quick.ablation.n_samples <= cpu.ablation.n_samples
    assert len(quick.ablation.seeds) <= len(cpu.ablation.seeds)


def test_cpu_ablation_trains_on_chapter_04s_recipe():
    """Chapter 07 compares skip variants at chapter 04's budget (issue 11): the same TrainConfig."""
    cpu = get_preset("cpu")
    assert cpu.ablation.train == cpu.train
    assert cpu.ablation.model.skip == "pre"


def _notebook_code(path):
    nb = json.loads(path.read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_chapters_read_only_knobs_the_preset_has(path):
    """Every ``preset.x`` / ``preset.x.y`` a chapter reads exists on every preset."""
    code = _notebook_code(path)
    missing = set()
    for chain in re.findall(r"\bpreset((?:\.[A-Za-z_]\w*)+)", code):
        for name in NAMES:
            obj = get_preset(name)
            for attr in chain.strip(".").split("."):
                if isinstance(obj, (Preset, AblationConfig, ModelConfig, TrainConfig, DiffusionConfig)):
                    if not hasattr(obj, attr):
                        missing.add(f"preset{chain} ({name})")
                        break
                    obj = getattr(obj, attr)
                else:
                    break
    assert not missing, f"{path.name} reads settings no preset has: {sorted(missing)}"


# --- the one mode switch -----------------------------------------------------------------------

@pytest.mark.parametrize("value, quick", [("1", True), ("true", True), ("YES", True), (" 1 ", True),
                                          ("0", False), ("", False), ("no", False)])
def test_ddpm_quick_switch(monkeypatch, value, quick):
    monkeypatch.setenv("DDPM_QUICK", value)
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: False)
    assert is_quick() is quick
    assert preset_name() == ("quick" if quick else "cpu")
    assert get_preset().name == preset_name()


def test_preset_and_device_follow_hardware(monkeypatch):
    monkeypatch.delenv("DDPM_QUICK", raising=False)
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: True)
    assert preset_name() == "gpu" and default_device() == torch.device("cuda")
    assert resolve_device(None) == torch.device("cuda") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: False)
    assert preset_name() == "cpu" and default_device() == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")


# --- run info --------------------------------------------------------------------------------

def test_hardware_summary_names_the_cpu_and_torch():
    line = runinfo.hardware_summary("cpu")
    assert line.startswith(f"CPU {runinfo.cpu_name()} (")
    assert f"{torch.get_num_threads()} threads" in line and line.endswith(f"torch {torch.__version__}")


def test_describe_run_reports_the_preset_it_is_given(monkeypatch):
    """Not the environment's: get_preset('cpu') under DDPM_QUICK=1 is described as cpu."""
    monkeypatch.setenv("DDPM_QUICK", "1")
    line = runinfo.describe_run(get_preset("cpu"), device="cpu")
    assert line.startswith(f"preset 'cpu' ({get_preset('cpu').description}) on CPU ")
    assert "quick" not in line and "DDPM_QUICK" not in line
    assert re.search(r"; run \d{4}-\d{2}-\d{2}$", line)
    assert runinfo.describe_run(get_preset("quick"), device="cpu").startswith("preset 'quick' (CI smoke run")


# --- errors ------------------------------------------------------------------------------------

CONFIG_ERRORS = [
    (DiffusionConfig, dict(schedule="sigmoid"), r"schedule must be one of \('linear', 'cosine'\), got 'sigmoid'"),
    (DiffusionConfig, dict(T=0), "T must be an integer >= 1, got 0"),
    (DiffusionConfig, dict(T=10.5), "T must be an integer >= 1, got 10.5"),
    (DiffusionConfig, dict(beta_start=0.1, beta_end=0.01), "need 0 < beta_start <= beta_end < 1"),
    (DiffusionConfig, dict(prediction="x0"), r"prediction must be one of \('eps', 'v'\), got 'x0'"),
    (DiffusionConfig, dict(zero_terminal_snr=True), "zero_terminal_snr=True needs prediction='v'"),
    *[(TrainConfig, dict(ema_decay=bad), rf"ema_decay must be in \[0, 1\), got {bad}") for bad in (1.0, -0.1, 1.5)],
    (TrainConfig, dict(lr_decay="linear"), r"lr_decay must be one of \('constant', 'cosine'\), got 'linear'"),
    (TrainConfig, dict(steps=0), "steps must be >= 1, got 0"),
    (TrainConfig, dict(batch_size=0), "batch_size must be >= 1, got 0"),
    *[(TrainConfig, dict(lr=bad), "lr must be a finite number > 0") for bad in (0.0, -1e-3, float("inf"), float("nan"))],
    (TrainConfig, dict(subset=-1), "subset must be >= 0"),
    *[(TrainConfig, dict(adam_beta2=bad), r"adam_beta2 must be in \(0, 1\)") for bad in (0.0, 1.0, float("nan"))],
    (TrainConfig, dict(loss_weight="p2"), r"loss_weight must be one of \('simple', 'min_snr'\), got 'p2'"),
    *[(TrainConfig, dict(min_snr_gamma=bad), "min_snr_gamma must be a finite number > 0") for bad in (0.0, float("nan"))],
    *[(TrainConfig, dict(ema_power=bad), "ema_power must be a finite number >= 0") for bad in (-1.0, float("inf"))],
    (ModelConfig, dict(dropout=1.0), "dropout must be in"),
]


@pytest.mark.parametrize("cls, fields, message", CONFIG_ERRORS,
                         ids=[f"{c.__name__}-{next(iter(f))}" for c, f, _ in CONFIG_ERRORS])
def test_config_errors(cls, fields, message):
    with pytest.raises(ValueError, match=message):
        cls(**fields)


def test_paper_defaults():
    d, m, t = DiffusionConfig(), ModelConfig(), TrainConfig()
    assert (d.T, d.schedule, d.beta_start, d.beta_end) == (1000, "linear", 1e-4, 0.02)
    assert m.skip == "pre" and m.widths == (32, 64, 64) and m.temb_dim == 128
    assert t.lr == 2e-4 and t.lr_decay == "constant" and t.grad_clip == 1.0
    assert ModelConfig(time_embed_dim=33).temb_dim == 33
