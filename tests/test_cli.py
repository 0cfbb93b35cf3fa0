"""The command line: ``python -m ddpm_tutorial train`` / ``sample``, through ``main([...])``."""
import os

import matplotlib.image
import pytest
import torch

import ddpm_tutorial.data as data
from ddpm_tutorial.__main__ import main
from ddpm_tutorial.checkpoint import load_checkpoint

needs_data = pytest.mark.skipif(
    not all((data.DEBIAN_DIR / f"{n}.gz").exists() for n in data.IDX_FILES),
    reason=f"Debian package dataset-fashion-mnist not installed ({data.DEBIAN_DIR} missing)")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One quick-preset run of 3 steps on 64 images; returns (checkpoint path, its stdout)."""
    tmp = tmp_path_factory.mktemp("cli")
    ck = tmp / "ck.pt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp / "xdg"))
        mp.delenv("DDPM_DATA_DIR", raising=False)
        code = main(["train", "--preset", "quick", "--steps", "3", "--subset", "64", "--out", str(ck)])
    assert code == 0
    return ck


@pytest.mark.slow
@pytest.mark.xdist_group("cli_checkpoint")   # one worker trains once for the three
@needs_data
def test_train_writes_a_checkpoint(trained, capsys):
    ckpt = load_checkpoint(trained)
    assert ckpt["step"] == 3 and len(ckpt["history"]["loss"]) == 3
    assert ckpt["config"]["train"]["subset"] == 64
    assert ckpt["config"]["model"]["base_channels"] == 16          # the quick preset's model
    assert "optimizer" in ckpt and "model" in ckpt


@pytest.mark.slow
@pytest.mark.xdist_group("cli_checkpoint")   # one worker trains once for the three
@needs_data
def test_sample_writes_png_and_tensor(trained, tmp_path, capsys):
    png, pt = tmp_path / "x.png", tmp_path / "x.pt"
    code = main(["sample", "--checkpoint", str(trained), "--n", "2", "--ddim-steps", "2",
                 "--png", str(png), "--tensor", str(pt)])
    assert code == 0
    images = torch.load(pt, weights_only=True)
    assert images.shape == (2, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1
    grid = matplotlib.image.imread(png)
    assert grid.shape[:2] == (28, 2 * 28 + 1)                      # two images side by side, 1 px apart
    out = capsys.readouterr().out
    assert f"wrote {png}" in out and "tensor (2, 1, 28, 28)" in out


@pytest.mark.slow
@pytest.mark.xdist_group("cli_checkpoint")   # one worker trains once for the three
@needs_data
def test_train_resume_continues(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(trained.parent / "xdg"))
    monkeypatch.delenv("DDPM_DATA_DIR", raising=False)
    out = tmp_path / "more.pt"
    assert main(["train", "--resume", str(trained), "--steps", "4", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 4
    assert ckpt["history"]["loss"][:3] == load_checkpoint(trained)["history"]["loss"]


def test_missing_checkpoint_exits_1_with_a_clear_error(tmp_path, capsys):
    code = main(["sample", "--checkpoint", str(tmp_path / "nope.pt"), "--n", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint at") and "nope.pt" in err
    assert "python -m ddpm_tutorial train --out PATH" in err
    assert not (tmp_path / "samples.png").exists()


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--preset", "huge"])
    assert info.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


# --- bad input: one line, before any work (tests/test_robustness.py runs the CLI in a subprocess) ---

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A training checkpoint (2 quick-preset steps on random images), its exported copy, the same
    with NaN EMA weights, an RGB 8px one, and things an output must never replace: a symbolic and
    a hard link to the checkpoint, an existing PNG, a FIFO."""
    import dataclasses
    import os
    from ddpm_tutorial.checkpoint import export_for_sampling, save_checkpoint
    from ddpm_tutorial.config import get_preset
    from ddpm_tutorial.train import build_trainer
    tmp = tmp_path_factory.mktemp("cli_bad")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(32, 1, 28, 28, generator=g) * 2 - 1
    build_trainer(get_preset("quick"), images, device="cpu").fit(steps=2, progress=False,
                                                                 checkpoint_path=tmp / "train.pt")
    export_for_sampling(tmp / "train.pt", tmp / "small.pt")
    ckpt = load_checkpoint(tmp / "train.pt")
    ckpt["ema"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    save_checkpoint(tmp / "nan.pt", {k: v for k, v in ckpt.items() if k != "format"})
    quick = get_preset("quick")
    rgb = dataclasses.replace(quick, model=dataclasses.replace(quick.model, in_channels=3, image_size=8))
    build_trainer(rgb, torch.rand(8, 3, 8, 8, generator=g) * 2 - 1, device="cpu",
                  train=dataclasses.replace(quick.train, batch_size=4)).fit(steps=1, progress=False,
                                                                         checkpoint_path=tmp / "rgb.pt")
    (tmp / "afile").write_text("x")
    (tmp / "old.png").write_bytes(b"an earlier grid")
    (tmp / "link.pt").symlink_to(tmp / "train.pt")
    os.link(tmp / "train.pt", tmp / "hard.png")
    os.mkfifo(tmp / "fifo.png")
    return tmp


BAD_INPUT = [
    ("train --steps 0 --out {d}/n.pt", 1, "error: steps must be >= 1, got 0"),
    ("train --batch-size 0 --out {d}/n.pt", 1, "error: batch_size must be >= 1, got 0"),
    ("train --lr 0 --out {d}/n.pt", 1, "error: lr must be a finite number > 0, got 0.0"),
    ("train --lr nan --out {d}/n.pt", 1, "error: lr must be a finite number > 0, got nan"),
    ("train --subset -3 --out {d}/n.pt", 1, "error: subset must be >= 0 (0 = all images), got -3"),
    ("train --save-every -1 --out {d}/n.pt", 2, "train: error: argument --save-every: must be >= 0, got -1 (see "),
    ("train --save-every abc --out {d}/n.pt", 2, "argument --save-every: must be an integer >= 0, got 'abc' (see "),
    ("train --steps many --out {d}/n.pt", 2, "train: error: argument --steps: invalid int value: 'many'"),
    ("train --out {d} --steps 2", 1, "error: --out {d} is a folder; give a file path such as {d}/model.pt"),
    ("train --out {d}/new/deeper/n.pt --steps 0", 1, "error: steps must be >= 1, got 0"),   # and no folder made
    ("train --out {d}/train.pt --steps 9", 1, "train.pt already exists; pass --force to overwrite it, --resume"),
    ("train --resume {d}/train.pt --preset quick --steps 9", 1, "--preset quick cannot be combined with --resume"),
    ("train --resume {d}/train.pt --batch-size 4 --steps 9", 1, "only --steps may change, not --batch-size"),
    ("train --resume {d}/train.pt --conditional --steps 9", 1, "--conditional cannot be combined with --resume"),
    ("train --resume {d}/train.pt --steps 2", 1, "has already trained 2 steps; pass --steps N with N > 2"),
    ("train --resume {d}/small.pt --steps 9", 1, "small.pt holds no optimiser state (an exported checkpoint)"),
    ("train --resume {d}/nope.pt --steps 9", 1, "error: no checkpoint at"),
    ("train --resume {d}/nan.pt --steps 9", 1, "nan.pt holds NaN or inf weights (ema "),
    ("train --resume {d}/rgb.pt --steps 9 --out {d}/r.pt", 1, "rgb.pt was trained on your own 3-channel 8px "
     "images, not Fashion-MNIST: pass --images DIR, the folder it was trained on"),
    ("train --image-size 32 --out {d}/n.pt", 1, "error: --image-size applies to your own images: add --images DIR"),
    ("train --image-size 32 --channels 3 --out {d}/n.pt", 1, "--image-size and --channels apply to your own images"),
    ("train --images {d} --workers 100000 --out {d}/n.pt", 1, "--workers 100000 is more than 4 per CPU core"),
    ("train --images {d} --image-size 100000 --out {d}/n.pt", 1, "of memory to train at 100000x100000 px, this "
     "machine has"),
    ("train --preset quick --batch-size 1000000000 --out {d}/n.pt", 1,
     "--batch-size 1000000000 needs about"),
    ("sample --checkpoint {d}/train.pt --n 0", 1, "error: --n must be >= 1, got 0"),
    ("sample --checkpoint {d}/train.pt --n 1000000000", 1, "error: --n 1000000000 needs about"),
    ("sample --checkpoint {d}/train.pt --ddim-steps 2 --eta nan", 1, "error: --eta must be in [0, 1]"),
    ("sample --checkpoint {d}/train.pt --ddim-steps 2 --eta -0.5", 1, "error: --eta must be in [0, 1]"),
    ("sample --checkpoint {d}/train.pt --eta 0.5", 1, "--eta 0.5 applies to DDIM only: add --ddim-steps N"),
    ("sample --checkpoint {d}/train.pt --ddim-steps 5000", 1, "--ddim-steps must be at most the checkpoint's T = 1000"),
    ("sample --checkpoint {d}/train.pt --guidance 2", 1, "--guidance needs --class"),
    ("sample --checkpoint {d}/train.pt --class boots", 1, "this checkpoint has no class embedding"),
    ("sample --checkpoint {d}/train.pt --png {d}", 1, "error: --png {d} is a folder; give a file path such as"),
    ("sample --checkpoint {d}/train.pt --png {d}/grid", 1, "unknown extension (none)"),
    ("sample --checkpoint {d}/train.pt --tensor {d}/afile/t.pt", 1, "afile is a file, not a folder"),
    ("sample --checkpoint {d}/afile", 1, "is not a readable ddpm_tutorial checkpoint (corrupt, truncated"),
    ("sample --checkpoint {d}/nope.pt --png {d}/new/x.png", 1, "error: no checkpoint at"),   # and no folder made
    ("sample --checkpoint {d}/nan.pt", 1, "nan.pt holds NaN or inf weights (ema "),
    ("sample --checkpoint {d}/train.pt --tensor {d}/train.pt", 1,
     "error: --tensor {d}/train.pt is the --checkpoint file itself: writing it would destroy"),
    ("sample --checkpoint {d}/link.pt --tensor {d}/train.pt", 1, "is the --checkpoint file itself"),
    ("sample --checkpoint {d}/train.pt --png {d}/hard.png --force", 1, "--png {d}/hard.png is the --checkpoint file"),
    ("sample --checkpoint {d}/train.pt --png {d}/x.png --tensor {d}/x.png", 1, "--png and --tensor both name"),
    ("sample --checkpoint {d}/train.pt --png {d}/old.png", 1,
     "old.png already exists; pass --force to overwrite it, or choose another --png"),
    ("sample --checkpoint {d}/train.pt --png {d}/fifo.png --force", 1,
     "--png {d}/fifo.png is a FIFO (named pipe), not a file; choose a file path (--force never replaces it)"),
    ("export --checkpoint {d}/train.pt --out {d}/small.pt", 1, "small.pt already exists; pass --force to "
                                                              "overwrite it, or choose another --out"),
    ("export --checkpoint {d}/train.pt --out {d}/train.pt --force", 1, "is the --checkpoint file itself"),
    ("export --checkpoint {d}/train.pt --out /dev/full --force", 1, "/dev/full is a character device, not a file"),
    ("export --checkpoint {d}/nan.pt --out {d}/n2.pt", 1, "nan.pt holds NaN or inf weights (ema "),
]


def _tree(folder):
    """Every path under ``folder`` with the bytes of each regular file (not following the FIFO)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else p.is_dir())
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("argv, code, message", BAD_INPUT)
def test_bad_input_is_one_line(checkpoints, capsys, argv, code, message):
    if "/dev/full" in argv and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    before = _tree(checkpoints)
    try:
        got = main(argv.format(d=checkpoints).split())
    except SystemExit as exit_:                # argparse's usage errors
        got = exit_.code
    out, err = capsys.readouterr()
    assert got == code, err
    message = message.format(d=checkpoints)
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert "training:" not in err and not out          # refused before any work (and before printing)
    assert _tree(checkpoints) == before                 # nothing written, replaced, or made (no empty folders)


def test_class_names_come_from_the_checkpoint(tmp_path, capsys):
    """A conditional model trained on a two-class folder keeps the folder's class names: --class
    takes them (any case) or their index, and refuses the rest naming them; resuming keeps them."""
    from PIL import Image
    from ddpm_tutorial.checkpoint import model_from_checkpoint
    from ddpm_tutorial.sampling import ddim_sample
    g = torch.Generator().manual_seed(0)
    for name in ("cats", "dogs"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(8, 8, 3, generator=g) * 255).byte().numpy()
            Image.fromarray(pixels).save(tmp_path / "pets" / name / f"{i}.png")
    ck = tmp_path / "pets.pt"
    assert main(["train", "--preset", "quick", "--images", str(tmp_path / "pets"), "--image-size", "8",
                 "--conditional", "--steps", "1", "--batch-size", "4", "--out", str(ck)]) == 0
    ckpt = load_checkpoint(ck)
    assert ckpt["classes"] == ["cats", "dogs"] and ckpt["preset"] == "quick"
    assert ckpt["config"]["model"]["num_classes"] == 2
    model, schedule, _ = model_from_checkpoint(ck)
    expected = ddim_sample(model, schedule, n=1, steps=2, seed=0, y=1).images
    for i, cls in enumerate(("dogs", "DOGS", "1")):
        out = tmp_path / f"s{i}.pt"
        assert main(["sample", "--checkpoint", str(ck), "--class", cls, "--n", "1", "--ddim-steps", "2",
                     "--tensor", str(out)]) == 0
        assert torch.equal(torch.load(out, weights_only=True), expected)
    capsys.readouterr()
    for cls in ("sneaker", "2"):
        assert main(["sample", "--checkpoint", str(ck), "--class", cls, "--n", "1", "--ddim-steps", "2",
                     "--tensor", str(tmp_path / "no.pt")]) == 1
        assert capsys.readouterr().err == (f"error: unknown class '{cls}'; expected an index 0-1 or one of: "
                                           "cats, dogs\n")
    assert main(["train", "--resume", str(ck), "--images", str(tmp_path / "pets"), "--steps", "2"]) == 0
    resumed = load_checkpoint(ck)
    assert resumed["step"] == 2 and resumed["classes"] == ["cats", "dogs"] and resumed["preset"] == "quick"
    (tmp_path / "pets" / "birds").mkdir()
    Image.fromarray((torch.rand(8, 8, 3, generator=g) * 255).byte().numpy()).save(tmp_path / "pets" / "birds" / "0.png")
    capsys.readouterr()
    assert main(["train", "--resume", str(ck), "--images", str(tmp_path / "pets"), "--steps", "3"]) == 1
    assert "was trained on the classes cats, dogs; the subfolders of" in capsys.readouterr().err


def _pictures(folder, n, size=(8, 8), grey=False, seed=0):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        pixels = (torch.rand(size[1], size[0], *(() if grey else (3,)), generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def test_own_images_say_what_they_do_to_the_pictures(tmp_path, capsys):
    """Nothing done to the pictures silently: 2x2 images scaled up 8x, idle decoding workers, grey
    images made RGB for --channels 3 are said; grey images for a resumed colour model are refused."""
    tiny = _pictures(tmp_path / "tiny", 3, size=(2, 2))
    assert main(["train", "--preset", "quick", "--images", str(tiny), "--image-size", "16", "--workers", "4",
                 "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "tiny.pt")]) == 0
    out = capsys.readouterr().out
    assert (f"3 of 3 images are less than half of 16 px on their shorter side and are scaled up (the smallest, "
            f"{tiny / '0.png'}, 2x2, 8x): they will look blurred; choose a smaller --image-size, or larger images") in out
    assert "3 images make 1 batch of 256 to decode: 1 of the 4 --workers are used" in out
    grey = _pictures(tmp_path / "grey", 4, grey=True)
    assert main(["train", "--preset", "quick", "--images", str(grey), "--image-size", "8", "--channels", "3",
                 "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "rgb.pt")]) == 0
    assert f"all 4 images in {grey} are greyscale: each is made RGB (three equal channels)" in capsys.readouterr().out
    colour = _pictures(tmp_path / "colour", 4)
    assert main(["train", "--preset", "quick", "--images", str(colour), "--image-size", "8", "--steps", "1",
                 "--batch-size", "2", "--out", str(tmp_path / "c.pt")]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "c.pt"), "--images", str(grey), "--steps", "2"]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'c.pt'} is a colour model, but every image in {grey} is "
                                       "greyscale: resume it on the colour images it was trained on, or start a grey "
                                       "run (--channels 1)\n")
    assert load_checkpoint(tmp_path / "c.pt")["step"] == 1


def test_an_unreadable_image_while_streaming_says_whether_to_resume(tmp_path, capsys):
    folder = _pictures(tmp_path / "imgs", 4, size=(64, 64))
    whole = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(whole[:len(whole) // 2])          # the header reads, the pixels do not
    assert main(["train", "--preset", "quick", "--images", str(folder), "--image-size", "8", "--stream", "--workers",
                 "0", "--steps", "3", "--batch-size", "4", "--out", str(tmp_path / "s.pt")]) == 1
    err = capsys.readouterr().err.splitlines()[-1]                   # after the progress bar of step 0
    assert err.startswith(f"error: image {folder / '1.png'} could not be decoded (OSError: ") and err.endswith(
        "; delete it or replace it with a good copy; nothing was saved in this run: then run the command again"), err
    assert not (tmp_path / "s.pt").exists()
