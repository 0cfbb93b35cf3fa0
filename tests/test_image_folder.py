"""Issue 17: training on your own images. A folder of PNG / JPEG files becomes (N, C, S, S) in
[-1, 1] (resized, center-cropped, grey or RGB); its errors are one clear line; the streamed path
trains exactly as the in-memory one; the cifar and rgb64 presets train a few steps on CPU."""
from __future__ import annotations

import dataclasses
import math

import matplotlib.image
import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_tutorial.image_folder as image_folder_module
from conftest import random_images
from ddpm_tutorial.__main__ import main
from ddpm_tutorial.checkpoint import load_checkpoint
from ddpm_tutorial.config import TrainConfig, get_preset
from ddpm_tutorial.image_folder import ImageFolder, ImageFolderError, find_images, load_image, load_image_folder
from ddpm_tutorial.train import ShardSampler, batch_indices, build_trainer
from ddpm_tutorial.unet import UNet, count_parameters


def save(path, pixels, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode).save(path)
    return path


def rgb_folder(root, n=12, size=(20, 14), seed=0, layout=True):
    """n random colour images of ``size`` (W, H): PNG and JPEG, in class subfolders a/ b/ c/ when ``layout``."""
    g = np.random.default_rng(seed)
    for i in range(n):
        sub = "abc"[i % 3] + "/" if layout else ""
        save(root / f"{sub}{i:03d}.{'png' if i % 2 else 'jpg'}", g.integers(0, 256, (size[1], size[0], 3)))
    return root


def log_into(lines):
    return lambda *args, **kwargs: lines.append(" ".join(map(str, args)))


# --- reading ---------------------------------------------------------------------------------------

def test_rgb_folder_shapes_range_and_imagefolder_classes(tmp_path):
    rgb_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "a" / ".hidden.png").write_bytes(b"")           # hidden files are left out
    data, labels = load_image_folder(tmp_path / "imgs", image_size=16, log=lambda *a: None)
    assert data.shape == (12, 3, 16, 16) and data.dtype == torch.float32
    assert -1 <= data.min() < -0.9 and 0.9 < data.max() <= 1              # the whole [-1, 1] range is used
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4                # sorted paths: a/ b/ c/ -> 0 1 2
    assert ImageFolder(tmp_path / "imgs", 16).classes == ("a", "b", "c")
    flat = rgb_folder(tmp_path / "flat", n=4, layout=False)
    assert load_image_folder(flat, 8, log=lambda *a: None)[1] is None      # no class subfolders: no labels


def test_grey_folder_is_one_channel_and_scaled_like_fashion_mnist(tmp_path):
    save(tmp_path / "g" / "black.png", np.zeros((28, 28)))
    save(tmp_path / "g" / "white.png", np.full((28, 28), 255))
    save(tmp_path / "g" / "sub" / "mid.png", np.full((40, 40), 51))
    data, _ = load_image_folder(tmp_path / "g", image_size=28, log=lambda *a: None)
    assert data.shape == (3, 1, 28, 28)                                    # channels picked: all grey
    assert data[0].eq(-1).all() and data[2].eq(1).all()                    # sorted: black, sub/mid, white
    torch.testing.assert_close(data[1], torch.full((1, 28, 28), 51 / 127.5 - 1))
    assert load_image_folder(tmp_path / "g", 28, channels=3, log=lambda *a: None)[0].shape == (3, 3, 28, 28)


def test_resize_keeps_the_aspect_and_crops_the_center(tmp_path):
    """A 60x20 image, white in its middle 20x20 and black at the sides: a center crop gives white
    (the bicubic filter blends a little of the black neighbours into the edge columns); squashing
    the whole width into the square would make the outer thirds black (-1)."""
    pixels = np.zeros((20, 60, 3))
    pixels[:, 20:40] = 255
    path = save(tmp_path / "wide.png", pixels)
    x = load_image(path, image_size=8, channels=3)
    assert x.shape == (3, 8, 8) and x[:, :, 1:-1].min() > 0.99 and x.min() > 0.5
    tall = save(tmp_path / "tall.png", pixels.transpose(1, 0, 2))           # 20 x 60: the same, upright
    y = load_image(tall, 8, 3)
    assert y[:, 1:-1].min() > 0.99 and y.min() > 0.5


def test_colour_to_grey_is_luminance(tmp_path):
    path = save(tmp_path / "red.png", np.tile([255, 0, 0], (8, 8, 1)))
    expected = round(0.299 * 255) / 127.5 - 1                               # PIL: L = 299/1000 R + ...
    assert load_image(path, 8, 1).unique().tolist() == pytest.approx([expected], abs=1 / 127.5)


# --- errors ----------------------------------------------------------------------------------------

def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(ImageFolderError, match=r"the image folder .*nowhere does not exist; give a folder"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ImageFolderError, match=r"holds no \.png / \.jpg / \.jpeg images \(searched every subfolder\)"):
        ImageFolder(tmp_path / "empty")
    assert find_images(tmp_path / "empty") == []


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    rgb_folder(tmp_path / "imgs", n=6, layout=False)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"this is not a png")
    lines = []
    data, _ = load_image_folder(tmp_path / "imgs", 8, log=log_into(lines))
    assert data.shape == (6, 3, 8, 8)
    assert lines[0].startswith("skipped 1 of 7 files in ") and "broken.png" in lines[0]
    only_broken = tmp_path / "bad"
    only_broken.mkdir()
    (only_broken / "x.jpg").write_bytes(b"\xff\xd8 nothing")
    with pytest.raises(ImageFolderError, match=r"none of the 1 image files in .*bad could be read \(first: .*x\.jpg"):
        ImageFolder(only_broken, log=lambda *a: None)


def test_a_truncated_file_is_skipped_in_memory_and_named_when_streamed(tmp_path):
    """Its header reads, its pixels do not: left out (counted) when loading into memory; while
    streaming a fixed batch cannot lose it silently, so the error names it."""
    rgb_folder(tmp_path / "imgs", n=4, size=(64, 64), layout=False)
    whole = (tmp_path / "imgs" / "001.png").read_bytes()
    (tmp_path / "imgs" / "001.png").write_bytes(whole[:len(whole) // 2])
    lines = []
    folder = ImageFolder(tmp_path / "imgs", 8, log=log_into(lines))
    assert len(folder) == 4 and not lines                                   # the header scan cannot tell
    with pytest.raises(ImageFolderError, match=r"image .*001\.png could not be decoded .*delete it or replace it"):
        folder[1]
    data = folder.to_tensor(log=log_into(lines))
    assert data.shape == (3, 3, 8, 8) and len(folder) == 3
    assert lines == [f"skipped 1 of 4 images in {folder.root} whose pixels could not be decoded "
                     f"(first: {tmp_path / 'imgs' / '001.png'})"]


def test_mixed_grey_and_colour_is_refused_for_a_colour_model(tmp_path):
    rgb_folder(tmp_path / "imgs", n=3, layout=False)
    save(tmp_path / "imgs" / "zz_grey.png", np.zeros((10, 10)))
    with pytest.raises(ImageFolderError, match=r"mixes 1 greyscale images \(first: .*zz_grey\.png\) with 3 colour "
                                               r"ones .*or train a grey model with --channels 1"):
        ImageFolder(tmp_path / "imgs", 8)
    assert ImageFolder(tmp_path / "imgs", 8, channels=1)[0].shape == (1, 8, 8)   # grey model: converted


# --- training on a folder ----------------------------------------------------------------------------

def test_streamed_folder_trains_exactly_like_the_in_memory_tensor(tmp_path, make_preset, tiny_config):
    """Same seeded batches, flips and t, eps whether the images sit in memory or stream from disk."""
    rgb_folder(tmp_path / "imgs", n=20, layout=False)
    model = dataclasses.replace(tiny_config, in_channels=3)
    preset = make_preset(model=model, steps=5, batch_size=4, hflip=True)
    in_memory, _ = load_image_folder(tmp_path / "imgs", 8, log=lambda *a: None)
    streamed, _ = load_image_folder(tmp_path / "imgs", 8, in_memory=False, log=lambda *a: None)
    assert isinstance(streamed, ImageFolder)
    a = build_trainer(preset, in_memory, device="cpu")
    b = build_trainer(preset, streamed, device="cpu", loader_workers=0)
    first = a.draw_batch()
    assert all(torch.equal(u, v) for u, v in zip(first[:3], b.draw_batch()[:3]))
    assert all(torch.equal(u, v) for u, v in zip(first[:3], b.draw_batch()[:3]))   # a repeated draw restarts
    assert a.fit(progress=False).loss == b.fit(progress=False).loss
    assert torch.equal(a.model.conv_in.weight, b.model.conv_in.weight)


def test_hflip_mirrors_about_half_the_images(make_preset, tiny_config):
    data = random_images(64)
    plain = build_trainer(make_preset(batch_size=64), data, device="cpu").draw_batch()[0]
    flipped = build_trainer(make_preset(batch_size=64, hflip=True), data, device="cpu").draw_batch()[0]
    mirrored = [torch.equal(f, p.flip(-1)) for f, p in zip(flipped, plain)]
    kept = [torch.equal(f, p) for f, p in zip(flipped, plain)]
    assert all(m or k for m, k in zip(mirrored, kept)) and 16 < sum(mirrored) < 48


def test_shard_sampler_cuts_each_global_batch_into_disjoint_shards():
    shards = [ShardSampler(50, 12, seed=3, start=7, rank=r, world=3) for r in range(3)]
    streams = [iter(s) for s in shards]
    for step in range(7, 12):
        parts = [next(it) for it in streams]
        assert all(len(p) == 4 for p in parts)
        assert sum(parts, []) == batch_indices(50, 12, 3, step).tolist()   # in rank order: the global batch


def test_presets_for_colour_images_train_on_cpu(tmp_path):
    """cifar (32x32 RGB) and rgb64 (64x64 RGB): the documented sizes, shapes through the network, and
    two steps of their recipe on CPU at a batch of 2, on generated images read from a folder."""
    rgb_folder(tmp_path / "imgs", n=4, size=(80, 70), layout=False)
    expected = {"cifar": (32, 12_617_955), "rgb64": (64, 9_829_827)}          # sizes quoted in config.py
    for name, (size, params) in expected.items():
        preset = get_preset(name)
        assert (preset.model.image_size, preset.model.in_channels) == (size, 3)
        assert preset.train.hflip and preset.train.batch_size >= 64
        assert count_parameters(UNet(preset.model)) == params
        data, _ = load_image_folder(tmp_path / "imgs", size, log=lambda *a: None)
        assert data.shape == (4, 3, size, size)
        trainer = build_trainer(preset, data, device="cpu",
                                train=dataclasses.replace(preset.train, steps=2, batch_size=2))
        before = trainer.model.conv_out.weight.detach().clone()
        history = trainer.fit(progress=False)
        assert len(history.loss) == 2 and all(math.isfinite(v) for v in history.loss)
        assert not torch.equal(before, trainer.model.conv_out.weight)
        with torch.no_grad():
            assert trainer.ema.module(data[:1], torch.tensor([999])).shape == (1, 3, size, size)


def test_default_preset_choice_is_unchanged(monkeypatch):
    from ddpm_tutorial import config
    monkeypatch.delenv("DDPM_QUICK", raising=False)
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: False)
    assert config.preset_name() == "cpu"
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: True)
    assert config.preset_name() == "gpu"
    assert TrainConfig().hflip is False and TrainConfig().precision == "fp16"
    with pytest.raises(ValueError, match=r"precision must be one of \('fp16', 'bf16', 'fp32'\), got 'fp8'"):
        TrainConfig(precision="fp8")


# --- the command line --------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_trains_on_a_folder_and_samples_an_rgb_png(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDPM_QUICK", "1")
    rgb_folder(tmp_path / "imgs", n=12)
    ck, png = tmp_path / "mine.pt", tmp_path / "grid.png"
    assert main(["train", "--images", str(tmp_path / "imgs"), "--image-size", "16", "--flip", "--steps", "3",
                 "--batch-size", "4", "--conditional", "--out", str(ck)]) == 0
    out = capsys.readouterr().out
    assert f"read 12 RGB images from {tmp_path / 'imgs'} into memory, 16x16, 3 classes" in out
    ckpt = load_checkpoint(ck)
    model, train = ckpt["config"]["model"], ckpt["config"]["train"]
    assert (model["in_channels"], model["image_size"], model["num_classes"], ckpt["step"]) == (3, 16, 3, 3)
    assert train["hflip"] is True
    assert main(["train", "--resume", str(ck), "--images", str(tmp_path / "imgs"), "--steps", "4"]) == 0
    assert load_checkpoint(ck)["step"] == 4
    assert main(["sample", "--checkpoint", str(ck), "--n", "4", "--ddim-steps", "2", "--png", str(png)]) == 0
    grid = matplotlib.image.imread(png)
    assert grid.shape[:2] == (2 * 16 + 1, 2 * 16 + 1) and grid.shape[2] in (3, 4)     # 2 x 2 colour images
    assert not np.allclose(grid[..., 0], grid[..., 1])                                # not grey


@pytest.mark.parametrize("args, message", [
    (["--image-size", "32"], "--image-size applies to your own images: add --images DIR"),
    (["--images", "{d}/nowhere"], "--images {d}/nowhere: does not exist; give a folder of .png / .jpg images"),
    (["--images", "{d}", "--data", "{d}"], "--images (your own folder) and --data (Fashion-MNIST files) exclude"),
    (["--images", "{d}", "--image-size", "4"], "--image-size must be at least 8 pixels"),
    (["--images", "{d}/empty"], "holds no .png / .jpg / .jpeg images"),
    (["--images", "{d}/mixed"], "mixes 1 greyscale images"),
], ids=["size_without_images", "missing", "with_data", "too_small", "empty", "mixed"])
def test_cli_image_errors_are_one_line(tmp_path, capsys, args, message, monkeypatch):
    monkeypatch.setenv("DDPM_QUICK", "1")
    (tmp_path / "empty").mkdir()
    rgb_folder(tmp_path / "mixed", n=2, layout=False)
    save(tmp_path / "mixed" / "grey.png", np.zeros((8, 8)))
    args = [a.replace("{d}", str(tmp_path)) for a in args]
    assert main(["train", *args, "--steps", "2", "--out", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.replace("{d}", str(tmp_path)) in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.pt").exists()


def test_in_memory_is_decided_by_size(tmp_path, monkeypatch):
    rgb_folder(tmp_path / "imgs", n=3, layout=False)
    monkeypatch.setattr(image_folder_module, "IN_MEMORY_BYTES", 3 * 3 * 8 * 8 * 4)            # exactly fits
    assert isinstance(load_image_folder(tmp_path / "imgs", 8, log=lambda *a: None)[0], torch.Tensor)
    monkeypatch.setattr(image_folder_module, "IN_MEMORY_BYTES", 3 * 3 * 8 * 8 * 4 - 1)
    lines = []
    assert isinstance(load_image_folder(tmp_path / "imgs", 8, log=log_into(lines))[0], ImageFolder)
    assert "streamed from disk" in lines[0]
