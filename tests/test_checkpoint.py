"""Checkpoints: round trip, exact resume, atomic writes, and safe loading of bad files."""
import dataclasses
import os

import pytest
import torch

import ddpm_tutorial.checkpoint as checkpoint
from ddpm_tutorial.checkpoint import (CheckpointError, load_checkpoint, load_weights,
                                      model_from_checkpoint, save_checkpoint)
from ddpm_tutorial.config import DiffusionConfig, ModelConfig, TrainConfig
from ddpm_tutorial.train import Trainer
from ddpm_tutorial.unet import UNet

CFG = ModelConfig(image_size=8, base_channels=8, channel_mults=(1, 2), groups=4)
DIFF = DiffusionConfig(T=50)
TRAIN = TrainConfig(steps=6, batch_size=8, warmup_steps=2, ema_decay=0.8, num_t_buckets=5, seed=3)
DATA = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def make_trainer(init_seed=0, model_cfg=CFG, diffusion=DIFF):
    torch.manual_seed(init_seed)
    return Trainer(UNet(model_cfg), DATA, TRAIN, diffusion, device="cpu")


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
    assert load_checkpoint(path)["step"] == 1
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
    with pytest.raises(CheckpointError, match=r"lacks the keys .* it has \['weights'\]"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="it has Tensor"):
        load_checkpoint(tmp_path / "tensor.pt")
    torch.save({"format": "other/9", "config": {}, "step": 0, "ema": {}}, tmp_path / "fmt.pt")
    with pytest.raises(CheckpointError, match="has format 'other/9', expected 'ddpm_tutorial/1'"):
        load_checkpoint(tmp_path / "fmt.pt")
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
