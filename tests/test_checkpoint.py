"""Checkpoints: round trip, exact resume, atomic writes, and safe loading of bad files."""
import dataclasses
import os
from pathlib import Path

import pytest
import torch

import ddpm_tutorial.checkpoint as checkpoint
from conftest import TINY, random_images
from ddpm_tutorial.checkpoint import (RETIRED_TRAIN_FIELDS, CheckpointError, chapter_model,
                                      configs_from_checkpoint, export_for_sampling, load_checkpoint,
                                      load_checkpoint_dict, load_weights, model_from_checkpoint,
                                      reader_checkpoint_path, save_checkpoint, shipped_checkpoint_path)
from ddpm_tutorial.config import DiffusionConfig, ModelConfig, TrainConfig
from ddpm_tutorial.train import Trainer
from ddpm_tutorial.unet import UNet

CFG = TINY
DIFF = DiffusionConfig(T=50)
TRAIN = TrainConfig(steps=6, batch_size=8, warmup_steps=2, ema_decay=0.8, num_t_buckets=5, seed=3)
DATA = random_images(24)


def make_trainer(init_seed=0, model_cfg=CFG, diffusion=DIFF):
    torch.manual_seed(init_seed)
    return Trainer(UNet(model_cfg, T=diffusion.T), DATA, TRAIN, diffusion, device="cpu")


def _probe(cfg=CFG):
    g = torch.Generator().manual_seed(11)
    return torch.randn(3, 1, cfg.image_size, cfg.image_size, generator=g), torch.tensor([0, 20, 49])


@pytest.fixture
def trained(tmp_path):
    trainer = make_trainer()
    trainer.fit(steps=2, progress=False)
    path = trainer.save(tmp_path / "ck.pt")
    return trainer, path


def test_round_trip(trained):
    trainer, path = trained
    model, schedule, ckpt = model_from_checkpoint(path)
    assert model.config == trainer.model.config
    assert schedule.T == 50 and not model.training
    assert ckpt["step"] == 2 and ckpt["format"] == "ddpm_tutorial/1"
    assert ckpt["history"]["loss"] == trainer.history.loss
    x, t = _probe()
    with torch.no_grad():
        assert torch.equal(model(x, t), trainer.ema.module.eval()(x, t))
        raw, _, _ = model_from_checkpoint(path, use_ema=False)
        assert torch.equal(raw(x, t), trainer.model.eval()(x, t))
        assert not torch.equal(raw(x, t), model(x, t))                # EMA != raw weights
    # a loaded dict works as well as a path
    again, _, _ = model_from_checkpoint(load_checkpoint(path))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_resume_equals_straight_run(tmp_path):
    straight = make_trainer()
    straight.fit(steps=6, progress=False)

    first = make_trainer()
    first.fit(steps=3, progress=False)
    first.save(tmp_path / "half.pt")
    resumed = make_trainer(init_seed=123)      # different initial weights: resume must overwrite them
    resumed.resume(tmp_path / "half.pt")
    assert resumed.step == 3
    resumed.fit(steps=6, progress=False)

    assert resumed.history.loss == straight.history.loss
    assert resumed.history.t_bucket_count == straight.history.t_bucket_count
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(straight.ema.module.state_dict().items(), resumed.ema.module.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_errors(trained, tmp_path):
    _, path = trained
    other = make_trainer(model_cfg=dataclasses.replace(CFG, skip="post"))
    with pytest.raises(ValueError, match=r"was trained with ModelConfig\(.*skip='pre'.*not this trainer's ModelConfig\(.*skip='post'"):
        other.resume(path)
    with pytest.raises(ValueError, match="was trained with"):
        make_trainer(diffusion=DiffusionConfig(T=60)).resume(path)
    exported = make_trainer()
    exported.save(tmp_path / "export.pt", include_optimizer=False)
    with pytest.raises(ValueError, match="holds no optimiser state"):
        make_trainer().resume(tmp_path / "export.pt")


def test_atomic_write_survives_interruption(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"config": {}, "step": 1, "ema": {}})
    before = path.read_bytes()

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        f.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"config": {}, "step": 2, "ema": {}})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "new.pt", {"config": {}, "step": 2, "ema": {}})
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert load_checkpoint_dict(path)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]          # no temporary file, no half-written new.pt


class Payload:
    """Unpickling this would create a folder: the stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_tampered_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": "ddpm_tutorial/1", "config": {}, "step": 0, "ema": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a readable ddpm_tutorial checkpoint"):
        model_from_checkpoint(path)
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_missing_and_foreign_files(trained, tmp_path):
    _, path = trained
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.pt is not a readable ddpm_tutorial checkpoint \(corrupt, truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*nope.pt; train one with chapter 04 or "
                                              r"`python -m ddpm_tutorial train --out PATH`"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"foreign.pt is not a ddpm_tutorial checkpoint \(format None, "
                                              r"expected 'ddpm_tutorial/1'\)"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match=r"not a ddpm_tutorial checkpoint \(format 'Tensor'"):
        load_checkpoint(tmp_path / "tensor.pt")
    torch.save({"format": "other/9", "config": {}, "step": 0, "ema": {}}, tmp_path / "fmt.pt")
    with pytest.raises(CheckpointError, match="format 'other/9', expected 'ddpm_tutorial/1'"):
        load_checkpoint(tmp_path / "fmt.pt")
    torch.save({"format": "ddpm_tutorial/1", "weights": torch.zeros(3)}, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError, match=r"lacks the keys .* it has \['format', 'weights'\]"):
        load_checkpoint(tmp_path / "keys.pt")
    ckpt = load_checkpoint(path)
    ckpt["config"]["model"]["depth"] = 3                                 # from a future version
    with pytest.raises(CheckpointError, match="does not fit this version's dataclasses"):
        model_from_checkpoint(ckpt)


def test_loading_into_a_different_config_names_the_mismatch(trained):
    _, path = trained
    ckpt = load_checkpoint(path)
    wider = UNet(dataclasses.replace(CFG, base_channels=12))
    with pytest.raises(CheckpointError, match=r"ema weights do not fit this network.*different ModelConfig than "
                                              r"ModelConfig\(.*base_channels=12.*model_from_checkpoint.*size mismatch"):
        load_weights(wider, ckpt["ema"], "ema")
    with pytest.raises(CheckpointError, match="different ModelConfig"):
        load_weights(UNet(dataclasses.replace(CFG, attention=True)), ckpt["ema"], "ema")


def test_first_edition_checkpoints_still_load(trained, tmp_path):
    """Checkpoints written before the refactor hold skip=None and the retired bf16 /
    channels_last train fields: they load, with skip normalised to "none"."""
    _, path = trained
    ckpt = load_checkpoint(path)
    ckpt["config"]["model"]["skip"] = None
    ckpt["config"]["train"].update({name: False for name in RETIRED_TRAIN_FIELDS})
    model_cfg, _, train_cfg = configs_from_checkpoint(ckpt)
    assert model_cfg.skip == "none" and train_cfg == TRAIN
    assert RETIRED_TRAIN_FIELDS == ("bf16", "channels_last")
    with pytest.raises(CheckpointError, match="does not fit this version's dataclasses"):
        ckpt["config"]["train"]["fp8"] = True                      # an unknown field is not silently dropped
        configs_from_checkpoint(ckpt)


def test_shipped_checkpoint_rebuilds_its_model():
    model, schedule, ckpt = model_from_checkpoint()                # None: the shipped one
    assert shipped_checkpoint_path().is_file()
    assert "optimizer" not in ckpt and "model" not in ckpt         # exported: EMA weights only
    assert model.config == ModelConfig(**ckpt["config"]["model"]) and schedule.T == model.T == 1000
    assert shipped_checkpoint_path().stat().st_size < 5 * 1024 ** 2


# --- export for sampling ------------------------------------------------------------------------

def test_export_for_sampling_round_trip(trained, tmp_path):
    trainer, path = trained
    dest, size = export_for_sampling(path, tmp_path / "small" / "ship.pt")
    assert dest == tmp_path / "small" / "ship.pt" and size == dest.stat().st_size < path.stat().st_size
    small = load_checkpoint(dest)
    assert set(small) == {"format", "config", "step", "ema", "history"}     # no optimiser, no raw weights
    assert small["step"] == 2 and small["history"]["loss"] == trainer.history.loss
    model, schedule, _ = model_from_checkpoint(dest)
    x, t = _probe()
    with torch.no_grad():
        assert torch.equal(model(x, t), trainer.ema.module.eval()(x, t))
    assert schedule.T == DIFF.T
    with pytest.raises(ValueError, match="holds no optimiser state"):
        make_trainer().resume(dest)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        export_for_sampling(tmp_path / "missing.pt", tmp_path / "x.pt")


def test_load_checkpoint_dict_reads_any_ddpm_tutorial_file(tmp_path):
    """The ablation cache is a ddpm_tutorial file without a model: the dict reader takes it,
    the checkpoint reader asks for its keys."""
    path = save_checkpoint(tmp_path / "cache.pt", {"key": {"a": [1, 2]}, "results": []})
    assert load_checkpoint_dict(path)["key"] == {"a": [1, 2]}
    with pytest.raises(CheckpointError, match="lacks the keys"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_checkpoint_dict(tmp_path)


# --- the model later chapters sample from ----------------------------------------------------------

def test_reader_checkpoint_path():
    assert reader_checkpoint_path("cpu") == Path("runs") / "04_training_cpu.pt"
    assert reader_checkpoint_path("quick") != reader_checkpoint_path("gpu")


def test_chapter_model_falls_back_to_the_shipped_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                    # no runs/ here
    model, schedule, ckpt, source = chapter_model("cpu")
    shipped = load_checkpoint(shipped_checkpoint_path())
    assert ckpt["step"] == shipped["step"] and "shipped with the package" in source
    assert shipped_checkpoint_path().name in source and f"({shipped['step']} steps" in source
    assert all(torch.equal(a, shipped["ema"][k]) for k, a in model.state_dict().items())
    assert not model.training and schedule.T == 1000


def test_chapter_model_prefers_the_readers_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = make_trainer()
    trainer.fit(steps=2, progress=False)
    trainer.save(reader_checkpoint_path("quick"))                  # what chapter 04 writes
    model, schedule, ckpt, source = chapter_model("quick")
    assert ckpt["step"] == 2 and model.config == CFG and schedule.T == DIFF.T
    assert source.startswith(f"your chapter-04 checkpoint {reader_checkpoint_path('quick')} (2 steps, preset 'quick')")
    # another preset's reader checkpoint does not count
    assert "shipped" in chapter_model("cpu")[3]


# --- a damaged or tampered checkpoint is refused at load, naming the file, before any network is built ----

def _nan_first(weights: dict, value=float("nan")) -> dict:
    name = next(k for k, v in weights.items() if v.is_floating_point())
    return {**weights, name: torch.full_like(weights[name], value)}


TAMPERED = {
    "step -1": (lambda c: c.update(step=-1), r"its step must be an integer in \[0, 1e9\], got -1"),
    "step text": (lambda c: c.update(step="5"), r"its step must be an integer .* got '5'"),
    "step bool": (lambda c: c.update(step=True), r"its step must be an integer .* got True"),
    "huge network": (lambda c: c["config"]["model"].update(base_channels=40000),
                     r"ema weights do not fit the network its own config describes \(time_embed.mlp.0.weight has "
                     r"shape \(32, 8\), the config's network \(160000, 40000\); base_channels=40000"),
    "size as text": (lambda c: c["config"]["model"].update(image_size="8"),
                     r"ModelConfig.image_size must be an integer, got '8'"),
    "size as bool": (lambda c: c["config"]["model"].update(image_size=True),
                     r"ModelConfig.image_size must be an integer, got True"),
    "mults as text": (lambda c: c["config"]["model"].update(channel_mults=["1", 2]),
                      r"ModelConfig.channel_mults must be a list of integers"),
    "T fraction": (lambda c: c["config"]["diffusion"].update(T=2.5), r"DiffusionConfig.T must be an integer, got 2.5"),
    "lr nan": (lambda c: c["config"]["train"].update(lr=float("nan")), r"TrainConfig.lr must be a finite number, got nan"),
    "range": (lambda c: c["config"]["model"].update(dropout=3.0), r"dropout must be in \[0, 1\), got 3.0"),
    "config list": (lambda c: c.update(config=[1]), r"config must hold the dicts 'model', 'diffusion' and 'train'"),
    "nan ema": (lambda c: c.update(ema=_nan_first(c["ema"])), r"holds NaN or inf weights \(ema time_embed"),
    "inf model": (lambda c: c.update(model=_nan_first(c["model"], float("inf"))), r"holds NaN or inf weights \(model"),
    "missing weight": (lambda c: c["ema"].pop("conv_out.bias"), r"ema weights do not fit .*\(missing \['conv_out.bias'\]"),
    "numbers": (lambda c: c["ema"].update({"conv_out.bias": 1.0}), r"its ema weights are not a state_dict of tensors"),
    "classes": (lambda c: c.update(classes=["a", "b"]), r"class names must be 0 non-empty strings"),
    "preset": (lambda c: c.update(preset=5), r"its preset name must be a string, got 5"),
}


@pytest.mark.parametrize("name", list(TAMPERED))
def test_damaged_checkpoints_are_refused_at_load(trained, tmp_path, name):
    import time
    _, path = trained
    change, message = TAMPERED[name]
    ckpt = load_checkpoint(path)
    change(ckpt)
    bad = save_checkpoint(tmp_path / "bad.pt", {k: v for k, v in ckpt.items() if k != "format"})
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - start < 5                 # refused before anything large is allocated
    with pytest.raises(CheckpointError, match=message):
        model_from_checkpoint(ckpt)                        # a dict is checked the same way


def test_preset_name_and_class_names_are_saved(trained, tmp_path):
    from ddpm_tutorial.train import build_trainer
    from ddpm_tutorial.config import get_preset
    preset = dataclasses.replace(get_preset("quick"), model=dataclasses.replace(CFG, num_classes=2),
                                 diffusion=DIFF, train=TRAIN)
    trainer = build_trainer(preset, DATA, device="cpu", labels=torch.arange(24) % 2)
    trainer.meta["classes"] = ["cats", "dogs"]
    trainer.fit(steps=1, progress=False, checkpoint_path=tmp_path / "c.pt")
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["preset"] == "quick" and ckpt["classes"] == ["cats", "dogs"]
