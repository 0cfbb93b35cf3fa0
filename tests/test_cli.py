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
