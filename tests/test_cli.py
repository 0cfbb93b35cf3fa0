"""The command line: ``python -m ddpm_tutorial train`` / ``sample``, through ``main([...])``."""
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
    """A training checkpoint (2 quick-preset steps on random images) and its exported copy."""
    from ddpm_tutorial.checkpoint import export_for_sampling
    from ddpm_tutorial.config import get_preset
    from ddpm_tutorial.train import build_trainer
    tmp = tmp_path_factory.mktemp("cli_bad")
    images = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    build_trainer(get_preset("quick"), images, device="cpu").fit(steps=2, progress=False,
                                                                 checkpoint_path=tmp / "train.pt")
    export_for_sampling(tmp / "train.pt", tmp / "small.pt")
    (tmp / "afile").write_text("x")
    return tmp


@pytest.mark.parametrize("argv, code, message", [
    ("train --steps 0 --out {d}/n.pt", 1, "error: steps must be >= 1, got 0"),
    ("train --batch-size 0 --out {d}/n.pt", 1, "error: batch_size must be >= 1, got 0"),
    ("train --lr 0 --out {d}/n.pt", 1, "error: lr must be a finite number > 0, got 0.0"),
    ("train --lr nan --out {d}/n.pt", 1, "error: lr must be a finite number > 0, got nan"),
    ("train --subset -3 --out {d}/n.pt", 1, "error: subset must be >= 0 (0 = all images), got -3"),
    ("train --save-every -1 --out {d}/n.pt", 2, "train: error: argument --save-every: must be >= 0, got -1 (see "),
    ("train --steps many --out {d}/n.pt", 2, "train: error: argument --steps: invalid int value: 'many'"),
    ("train --out {d} --steps 2", 1, "is a folder; give a file path such as"),
    ("train --out {d}/train.pt --steps 9", 1, "train.pt already exists; pass --force to overwrite it, --resume"),
    ("train --resume {d}/train.pt --preset quick --steps 9", 1, "--preset quick cannot be combined with --resume"),
    ("train --resume {d}/train.pt --batch-size 4 --steps 9", 1, "only --steps may change, not --batch-size"),
    ("train --resume {d}/train.pt --conditional --steps 9", 1, "--conditional cannot be combined with --resume"),
    ("train --resume {d}/train.pt --steps 2", 1, "has already trained 2 steps; pass --steps N with N > 2"),
    ("train --resume {d}/small.pt --steps 9", 1, "small.pt holds no optimiser state (an exported checkpoint)"),
    ("train --resume {d}/nope.pt --steps 9", 1, "error: no checkpoint at"),
    ("sample --checkpoint {d}/train.pt --n 0", 1, "error: --n must be >= 1, got 0"),
    ("sample --checkpoint {d}/train.pt --ddim-steps 2 --eta nan", 1, "error: --eta must be in [0, 1]"),
    ("sample --checkpoint {d}/train.pt --ddim-steps 2 --eta -0.5", 1, "error: --eta must be in [0, 1]"),
    ("sample --checkpoint {d}/train.pt --eta 0.5", 1, "--eta 0.5 applies to DDIM only: add --ddim-steps N"),
    ("sample --checkpoint {d}/train.pt --ddim-steps 5000", 1, "--ddim-steps must be at most the checkpoint's T = 1000"),
    ("sample --checkpoint {d}/train.pt --guidance 2", 1, "--guidance needs --class"),
    ("sample --checkpoint {d}/train.pt --class boots", 1, "unknown class 'boots'"),
    ("sample --checkpoint {d}/train.pt --png {d}", 1, "is a folder; give a file path such as"),
    ("sample --checkpoint {d}/train.pt --png {d}/grid", 1, "unknown extension (none)"),
    ("sample --checkpoint {d}/train.pt --tensor {d}/afile/t.pt", 1, "afile is a file, not a folder"),
    ("sample --checkpoint {d}/afile", 1, "is not a readable ddpm_tutorial checkpoint (corrupt, truncated"),
    ("export --checkpoint {d}/train.pt --out {d}/small.pt", 1, "small.pt already exists; pass --force to "
                                                              "overwrite it, or choose another --out"),
    ("export --checkpoint {d}/train.pt --out {d}/train.pt --force", 1, "is the --checkpoint itself"),
])
def test_bad_input_is_one_line(checkpoints, capsys, argv, code, message):
    before = {p.name: p.read_bytes() for p in checkpoints.iterdir() if p.is_file()}
    try:
        got = main(argv.format(d=checkpoints).split())
    except SystemExit as exit_:                # argparse's usage errors
        got = exit_.code
    out, err = capsys.readouterr()
    assert got == code, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert "training:" not in err and not out          # refused before any work (and before printing)
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir() if p.is_file()} == before
    assert not (checkpoints / "samples.png").exists() and not (checkpoints / "n.pt").exists()
