"""Issue 12: every command a learner types either works or says, in one line, exactly what to fix,
and no training run is lost. The CLI runs here as the learner runs it, ``python -m ddpm_tutorial``
in a subprocess (exit code, stderr, files left behind), including a real Ctrl-C (SIGINT).

book/troubleshooting.md lists the same cases for the reader: error message -> cause -> fix.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm_tutorial import metrics
from ddpm_tutorial.checkpoint import load_checkpoint, save_checkpoint
from ddpm_tutorial.config import get_preset
from ddpm_tutorial.data import IDX_FILES
from ddpm_tutorial.outputs import STALE_TMP_SECONDS
from ddpm_tutorial.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"train-images-idx3-ubyte": (60000, 28, 28), "train-labels-idx1-ubyte": (60000,),
          "t10k-images-idx3-ubyte": (10000, 28, 28), "t10k-labels-idx1-ubyte": (10000,)}


def cli_env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DDPM_DATA_DIR", "DDPM_TRACEBACK")}
    return {**env, "OMP_NUM_THREADS": "1", "DDPM_QUICK": "1", "XDG_CACHE_HOME": str(cache),
            "PYTHONPATH": str(ROOT), **extra}


def cli(args, cwd: Path, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm_tutorial", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def fake_data_folder(folder: Path) -> Path:
    """Well-formed Fashion-MNIST idx files in torchvision's layout, all pixels 0 (written sparse:
    instant). The CLI trains on them as on the real files, without decompressing 47 MB first."""
    raw = folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        shape = SHAPES[name]
        with open(raw / name, "wb") as f:
            f.write(struct.pack(f">{1 + len(shape)}I", 0x0800 + len(shape), *shape))
            f.truncate(4 + 4 * len(shape) + torch.Size(shape).numel())
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a trained checkpoint (2 steps of the quick preset on random images), the same
    checkpoint with NaN EMA weights, a v-prediction one, a folder, a plain file, an earlier ONNX
    export, good and corrupt data folders."""
    w = tmp_path_factory.mktemp("robust")
    images = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    quick = get_preset("quick")
    build_trainer(quick, images, device="cpu").fit(steps=2, progress=False, checkpoint_path=w / "good.pt")
    ckpt = load_checkpoint(w / "good.pt")
    ckpt["ema"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                   for k, v in ckpt["ema"].items()}
    save_checkpoint(w / "nan.pt", {k: v for k, v in ckpt.items() if k != "format"})
    v_pred = dataclasses.replace(quick, diffusion=dataclasses.replace(quick.diffusion, prediction="v"))
    build_trainer(v_pred, images, device="cpu").fit(steps=1, progress=False, checkpoint_path=w / "v.pt")
    (w / "folder").mkdir()
    (w / "afile").write_text("not a folder")
    (w / "model.onnx").write_bytes(b"an earlier export")
    fake_data_folder(w / "data")
    bad = fake_data_folder(w / "corrupt") / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:1000])
    (w / "cache").mkdir()
    return w


# name: (command line, extra environment, exit code, text of the one error line). Every case runs
# in this process, in the folder above, and must leave every file there as it was, create none.
REFUSALS = {
    "out is a folder": (["train", "--out", "folder", "--steps", "2", "--subset", "64"], {}, 1,
                        "error: --out folder is a folder; give a file path such as folder/model.pt"),
    "out under a file": (["train", "--out", "afile/x.pt", "--steps", "2", "--subset", "64"], {}, 1,
                         "error: cannot write afile/x.pt: afile is a file, not a folder"),
    "steps 0": (["train", "--steps", "0", "--out", "new/s0.pt"], {}, 1, "error: steps must be >= 1, got 0"),
    "save-every -1": (["train", "--save-every", "-1", "--out", "se.pt"], {}, 2,
                      "argument --save-every: must be >= 0, got -1"),
    "existing checkpoint": (["train", "--out", "good.pt", "--steps", "2", "--subset", "64"], {}, 1,
                            "error: good.pt already exists; pass --force to overwrite it, --resume good.pt"),
    "preset with resume": (["train", "--resume", "good.pt", "--preset", "quick", "--steps", "5"], {}, 1,
                           "error: --preset quick cannot be combined with --resume"),
    "wrong --data": (["train", "--data", "nowhere", "--steps", "2", "--subset", "64", "--out", "new/wd.pt"], {}, 1,
                     "error: the data folder nowhere (--data / root=) does not exist"),
    "wrong DDPM_DATA_DIR": (["train", "--steps", "2", "--subset", "64", "--out", "we.pt"],
                            {"DDPM_DATA_DIR": "folder"}, 1,
                            "error: the data folder folder (DDPM_DATA_DIR) does not hold Fashion-MNIST"),
    "corrupt data file": (["train", "--data", "corrupt", "--steps", "2", "--subset", "64", "--out", "cd.pt"], {}, 1,
                          "error: Fashion-MNIST file corrupt/FashionMNIST/raw/train-labels-idx1-ubyte was found but "
                          "is corrupt: it has 1000 bytes, expected 60008 (truncated). To fix: replace it"),
    "batch above the data": (["train", "--data", "data", "--subset", "16", "--batch-size", "32", "--out", "b.pt"],
                             {}, 1, "error: --batch-size 32 is larger than the 16 training images: give "
                                    "--batch-size 16 or less, or more images"),
    "png extension": (["sample", "--checkpoint", "good.pt", "--n", "2", "--ddim-steps", "2", "--png", "grid.bmpx"],
                      {}, 1, "error: cannot write an image to grid.bmpx: unknown extension .bmpx; use one of"),
    "eta 5": (["sample", "--checkpoint", "good.pt", "--ddim-steps", "2", "--eta", "5", "--png", "e5.png"], {}, 1,
              "error: --eta must be in [0, 1]"),
    "nan weights": (["sample", "--checkpoint", "nan.pt", "--n", "2", "--png", "nan.png", "--tensor", "nan.t"], {}, 1,
                    "error: nan.pt holds NaN or inf weights (ema time_embed"),
    "tensor over the checkpoint": (["sample", "--checkpoint", "good.pt", "--tensor", "good.pt"], {}, 1,
                                   "error: --tensor good.pt is the --checkpoint file itself: writing it would "
                                   "destroy the --checkpoint it reads; choose another --tensor"),
    "onnx over the checkpoint": (["export-onnx", "--checkpoint", "good.pt", "--out", "good.pt", "--force"], {}, 1,
                                 "error: --out good.pt is the --checkpoint file itself"),
    "json over the checkpoint": (["export-onnx", "--checkpoint", "good.pt", "--schedule-json", "./good.pt",
                                  "--out", "m.onnx"], {}, 1, "error: --schedule-json good.pt is the --checkpoint file"),
    "onnx and json one file": (["export-onnx", "--checkpoint", "good.pt", "--out", "m.onnx", "--schedule-json",
                                "m.onnx"], {}, 1, "error: --out and --schedule-json both name m.onnx"),
    "onnx exists": (["export-onnx", "--checkpoint", "good.pt"], {}, 1,
                    "error: model.onnx already exists; pass --force to overwrite it, or choose another --out"),
    "onnx of v-prediction": (["export-onnx", "--checkpoint", "v.pt", "--force"], {}, 1,
                             "error: the in-browser demo runs eps-prediction models only"),
    "onnx of NaN weights": (["export-onnx", "--checkpoint", "nan.pt", "--out", "n.onnx"], {}, 1,
                            "error: nan.pt holds NaN or inf weights"),
    "onnx opset": (["export-onnx", "--checkpoint", "good.pt", "--out", "n.onnx", "--opset", "7"], {}, 1,
                   "error: --opset must be an integer in [14, 20] (attention needs 14; the page's onnxruntime-web "
                   "runs up to 20), got 7; the default is 20"),
    "onnx into a folder": (["export-onnx", "--checkpoint", "good.pt", "--out", "folder"], {}, 1,
                           "error: --out folder is a folder; give a file path such as folder/model.onnx"),
}


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*")) if "cache" not in p.parts}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused_in_one_line_before_any_work(work, name, monkeypatch, capsys):
    from ddpm_tutorial.__main__ import main
    args, extra, code, message = REFUSALS[name]
    monkeypatch.chdir(work)
    for key, value in {**cli_env(work / "cache"), **extra}.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    for key in ("DDPM_DATA_DIR", "DDPM_TRACEBACK"):
        if key not in extra:
            monkeypatch.delenv(key, raising=False)
    before = _snapshot(work)
    try:
        got = main(args)
    except SystemExit as exit_:                    # argparse's usage errors
        got = exit_.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err and got == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not re.search(r"training:|DDIM \d+ steps:|DDPM sampling", err)   # no progress bar: no work started
    assert not out.startswith("wrote")
    assert _snapshot(work) == before, "a refused command wrote, replaced or created something"


# In the child: the checkpoint's torch.save first says SAVING and waits, so that a second signal
# lands inside the save.
SLOW_SAVE = ("import sys, time, torch; real_save = torch.save\n"
             "def slow_save(*args, **kwargs):\n"
             "    print('SAVING', file=sys.stderr, flush=True); time.sleep(60); real_save(*args, **kwargs)\n"
             "torch.save = slow_save\n")


def _interrupted_run(work, tmp_path, signals, slow_save=False):
    """Train in a child process (quick preset, no periodic save), send ``signals[0]`` once a step
    has finished and each later one once the save it started has begun; returns
    (exit code, stdout, stderr, checkpoint path)."""
    out, err_file = tmp_path / "x.pt", tmp_path / "stderr.txt"
    with open(err_file, "w") as err:
        # A process started in the background by a non-interactive shell (`make test &`) inherits
        # SIGINT ignored, and Python then never raises KeyboardInterrupt: the training would run on.
        # The child restores Python's handler, as a terminal's Ctrl-C finds it.
        args = ["train", "--preset", "quick", "--steps", "100000", "--save-every", "0", "--subset", "64",
                "--data", str(work / "data"), "--out", str(out)]
        start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                 + (SLOW_SAVE if slow_save else "")
                 + f"sys.argv = ['ddpm_tutorial', *{args!r}]; runpy.run_module('ddpm_tutorial', run_name='__main__')")
        # tqdm redraws the bar at most every 2 s; a count >= 1 means a step has finished
        returncode, stdout = _signal_when([sys.executable, "-c", start], tmp_path, work, err, err_file,
                                          zip(signals, [r"\| *[1-9]\d*/100000 \[", *["SAVING"] * (len(signals) - 1)]))
    return returncode, stdout, err_file.read_text(), out


def _signal_when(command, cwd, work, err, err_file, plan) -> tuple:
    """Run ``command`` with stderr to ``err`` and, for each (signal, pattern) of ``plan`` in turn, send the
    signal once the pattern appears in ``err_file``; returns (exit code, stdout)."""
    proc = subprocess.Popen(command, cwd=cwd, env=cli_env(work / "cache"), stdout=subprocess.PIPE, stderr=err,
                            text=True)
    try:
        for sig, ready in plan:
            deadline = time.monotonic() + 150
            while not re.search(ready, err_file.read_text()):
                assert proc.poll() is None, f"the command ended early: {err_file.read_text()}"
                assert time.monotonic() < deadline, f"the command did not get there: {err_file.read_text()}"
                time.sleep(0.2)
            proc.send_signal(sig)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout


@pytest.mark.parametrize("sig, code, last_line", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated (SIGTERM)")],
                         ids=["ctrl-c", "sigterm"])
def test_a_signal_saves_a_resumable_checkpoint_and_resume_continues(work, tmp_path, sig, code, last_line):
    """A real SIGINT (Ctrl-C) or SIGTERM (SLURM, Docker, systemd, a recycled Colab runtime) during
    training: a checkpoint at the step reached, the resume hint, exit 130 / 143; after Ctrl-C,
    --resume continues from exactly there."""
    returncode, stdout, stderr, out = _interrupted_run(work, tmp_path, [sig])
    assert returncode == code, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == last_line, stderr
    saved = re.search(rf"interrupted at step (\d+): saved a resumable checkpoint to {re.escape(str(out))}", stdout)
    assert saved, stdout
    assert f"resume with: python -m ddpm_tutorial train --resume {out} --data {work / 'data'}" in stderr
    ckpt = load_checkpoint(out)
    step = int(saved.group(1))
    assert ckpt["step"] == step > 0 and len(ckpt["history"]["loss"]) == step and "optimizer" in ckpt
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())          # the umask, not 0600
    if sig != signal.SIGINT:
        return
    resumed = cli(["train", "--resume", out, "--steps", step + 2, "--data", work / "data"], tmp_path,
                  cli_env(work / "cache"))
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    assert f"(resumed from {out} at step {step})" in resumed.stdout
    after = load_checkpoint(out)
    assert after["step"] == step + 2 and after["history"]["loss"][:step] == ckpt["history"]["loss"]
    assert after["preset"] == "quick"


def test_a_second_ctrl_c_during_the_save_exits_130_without_a_traceback(work, tmp_path):
    """Ctrl-C, then Ctrl-C again while the checkpoint is being written: the save is abandoned
    (no half-written file, no temporary file left), the one message says nothing was saved, exit 130."""
    returncode, stdout, stderr, out = _interrupted_run(work, tmp_path, [signal.SIGINT, signal.SIGINT],
                                                       slow_save=True)
    assert returncode == 130 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line and "SAVING" not in line and "training" not in line]
    assert lines == ["interrupted again while saving: the save was abandoned (no half-written file); nothing "
                     "was saved in this run", "interrupted"], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt"]      # no checkpoint, no temporary file


def test_sigterm_while_sampling_writes_nothing_and_exits_143(work, tmp_path):
    """SIGTERM during `sample` (a job scheduler's time limit): neither output exists afterwards,
    complete or partial, no temporary file is left, one line says why, exit 143."""
    (tmp_path / "good.pt").write_bytes((work / "good.pt").read_bytes())
    err_file = tmp_path / "stderr.txt"
    with open(err_file, "w") as err:
        returncode, stdout = _signal_when(
            [sys.executable, "-m", "ddpm_tutorial", "sample", "--checkpoint", "good.pt", "--n", "256",
             "--png", "s.png", "--tensor", "s.pt"], tmp_path, work, err, err_file,
            [(signal.SIGTERM, r"\| *[1-9]\d*/\d+ \[")])                          # once a step has finished
    stderr = err_file.read_text()
    assert returncode == 143 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "terminated (SIGTERM)" and not stdout.startswith("wrote"), stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.pt", "stderr.txt"]


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_unexpected_errors_are_one_line_too(work, monkeypatch, capsys):
    """An exception of a kind no check foresaw still ends in one line (the traceback on request)."""
    from ddpm_tutorial import __main__ as cli_main

    def broken(args):
        raise KeyError("boom")
    monkeypatch.setattr(cli_main, "_export", broken)       # build_parser binds it when main() runs
    monkeypatch.delenv("DDPM_TRACEBACK", raising=False)
    assert cli_main.main(["export", "--checkpoint", "a", "--out", "b"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unexpected KeyError: 'boom' (likely a bug; rerun with DDPM_TRACEBACK=1")
    assert err.count("\n") == 1
    monkeypatch.setenv("DDPM_TRACEBACK", "1")
    with pytest.raises(KeyError):
        cli_main.main(["export", "--checkpoint", "a", "--out", "b"])


# --- the library's entry points (item 12) --------------------------------------------------------

def test_killed_save_leaves_no_stale_temporary_file(tmp_path):
    """kill -9 during a save leaves .<name>.*.tmp behind; the next save of that checkpoint removes it
    (but not a temporary file still being written, nor another checkpoint's)."""
    path = tmp_path / "run.pt"
    stale, live, other = (tmp_path / ".run.pt.abc123.tmp", tmp_path / ".run.pt.def456.tmp",
                          tmp_path / ".other.pt.abc123.tmp")
    for f in (stale, live, other):
        f.write_bytes(b"half a checkpoint")
    old = time.time() - STALE_TMP_SECONDS - 5
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    save_checkpoint(path, {"step": 1})
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.abc123.tmp", ".run.pt.def456.tmp", "run.pt"]


@pytest.mark.parametrize("n", [0, 1])
def test_metric_refuses_n_below_2(n):
    samples = torch.rand(4, 1, 28, 28) * 2 - 1
    with pytest.raises(ValueError, match=rf"n must be in \[2, 4\] \(4 samples given\), got {n}"):
        metrics.fashion_fd(samples, reference=samples, n=n)
    with pytest.raises(ValueError, match="need at least 2 images, got 1"):
        metrics.fashion_fd(samples[:1])


class _MakeFolder:
    """Unpickling this runs os.mkdir: what a tampered weights file could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _weights_file(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    good = metrics.read_weights()
    if kind == "folder":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(b"these are not weights")
    elif kind == "truncated":
        path.write_bytes(metrics.WEIGHTS.read_bytes()[:5000])
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "numbers":
        torch.save({"trunk.0.weight": 1.0}, path)
    elif kind == "other network":
        torch.save({"layer.weight": torch.zeros(2, 2)}, path)
    elif kind == "wrong shape":
        torch.save({**good, "head.weight": torch.zeros(3, good["head.weight"].shape[1])}, path)
    elif kind == "pickled code":
        torch.save({"head.bias": _MakeFolder(tmp_path / "code_ran")}, path)
    elif kind == "nan":
        torch.save({**good, "head.bias": torch.full_like(good["head.bias"], float("nan"))}, path)
    return path


@pytest.mark.parametrize("kind, error, message", [
    ("missing", FileNotFoundError, "classifier weights not found at .*missing.pt"),
    ("folder", FileNotFoundError, "classifier weights path .*folder.pt is a folder"),
    ("garbage", RuntimeError, r"classifier weights at .*garbage.pt are not a readable state_dict \(corrupt, truncated"),
    ("truncated", RuntimeError, r"classifier weights at .*truncated.pt are not a readable state_dict \(corrupt"),
    ("tensor", RuntimeError, r"tensor.pt are unusable: expected a state_dict .* found Tensor"),
    ("numbers", RuntimeError, r"numbers.pt are unusable: expected a state_dict .* not name -> tensor"),
    ("other network", RuntimeError, r"do not fit FashionClassifier \(missing: .*; unexpected: layer.weight\)"),
    ("wrong shape", RuntimeError, r"wrong shape: head.weight \(3, 64\) \(expected \(10, 64\)\)"),
    ("nan", RuntimeError, r"nan.pt are unusable: head.bias contain NaN or inf"),
    ("pickled code", RuntimeError, r"pickled code.pt are not a readable state_dict \(it holds a pickled object, "
                                   r"posix.mkdir, that weights_only=True refuses to load, so nothing in it ran"),
])
def test_unusable_classifier_weights_say_so(tmp_path, kind, error, message):
    path = _weights_file(tmp_path, kind)
    with pytest.raises(error, match=message) as info:
        metrics.load_classifier(path=path)
    text = str(info.value)
    assert "\n" not in text and "bench/train_classifier.py" in text
    assert "weights_only=False" not in text.replace("do not load it with weights_only=False", "")   # never advised
    assert not (tmp_path / "code_ran").exists()


def test_training_inputs_are_checked_once_before_training():
    """Images in [0, 1], an empty data set, T = 0, an empty schedule, t out of range: refused at the
    entry point with the value and what was expected (other kinds are in test_train/test_config)."""
    from ddpm_tutorial.config import DiffusionConfig
    from ddpm_tutorial.schedules import NoiseSchedule
    from ddpm_tutorial.unet import UNet
    preset = get_preset("quick")
    with pytest.raises(ValueError, match=r"looks scaled to \[0, 1\].*\(use 2 \* x - 1\)"):
        build_trainer(preset, torch.rand(8, 1, 28, 28), device="cpu")
    with pytest.raises(ValueError, match="got 0"):
        build_trainer(preset, torch.zeros(0, 1, 28, 28), device="cpu")
    with pytest.raises(ValueError, match="T must be an integer >= 1, got 0"):
        DiffusionConfig(T=0)
    with pytest.raises(ValueError, match="betas must be a 1-D tensor"):
        NoiseSchedule.from_betas(torch.zeros(0, dtype=torch.float64))
    net = UNet(preset.model, T=1000)
    for t in ([-1, 3], [3, 1000]):
        with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
            net(torch.zeros(2, 1, 28, 28), torch.tensor(t))


# --- full and read-only disks (a small tmpfs, mounted where the tests run as root) ---------------------

@pytest.fixture
def small_disk(tmp_path):
    """Factory: ``small_disk(kilobytes, read_only=False)`` -> a folder on a tmpfs of that size,
    unmounted afterwards. Skipped where mounting is not allowed (not root, no tmpfs, a container
    without CAP_SYS_ADMIN)."""
    mounted = []

    def make(kilobytes: int, read_only: bool = False) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        options = f"size={kilobytes}k" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                              text=True) if os.name == "posix" and os.geteuid() == 0 else None
        if proc is None or proc.returncode != 0:
            pytest.skip("cannot mount a small tmpfs here (needs root and mount permission): "
                        + (proc.stderr.strip() if proc else "not root"))
        mounted.append(where)
        return where
    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_disk_full_during_a_write_is_one_line_and_leaves_the_old_file(small_disk):
    """A write that runs out of space (torch.save's own error is '[enforce fail at
    inline_container.cc] unexpected pos'): one line naming the file, the bytes it needs and those
    free, and what is left; the old file intact, no temporary file, no folder the write made."""
    from ddpm_tutorial.outputs import DiskFullError, torch_save, write_file
    disk = small_disk(256)
    old = disk / "kept.pt"
    old.write_bytes(b"an earlier save")
    big = {"history": list(range(200_000))}        # pickled floats the size estimate does not count
    with pytest.raises(DiskFullError, match=rf"^disk full: cannot write {re.escape(str(old))} \(it needs about "
                                            rf"[\d.]+ kB, [\d.]+ k?B are free there\); {re.escape(str(old))} still "
                                            "holds its previous contents$"):
        torch_save(big, old)
    with pytest.raises(DiskFullError, match=r"cannot write .*new/deeper/x.bin .* no file was written$"):
        write_file(disk / "new" / "deeper" / "x.bin", lambda f: f.write(b"\0" * 400_000))
    assert old.read_bytes() == b"an earlier save"
    assert sorted(p.name for p in disk.iterdir()) == ["kept.pt"]          # no temporary file, no new folders


def test_a_disk_too_small_is_refused_before_any_work(small_disk, work, monkeypatch, capsys):
    """train and sample know their output's size: a disk without room is said before training
    or sampling starts."""
    from ddpm_tutorial.__main__ import main
    disk = small_disk(64)
    monkeypatch.setenv("XDG_CACHE_HOME", str(work / "cache"))
    assert main(["train", "--preset", "quick", "--data", str(work / "data"), "--subset", "16", "--batch-size", "8",
                 "--out", str(disk / "runs" / "x.pt")]) == 1
    assert main(["sample", "--checkpoint", str(work / "good.pt"), "--n", "64", "--tensor", str(disk / "s.pt")]) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert re.fullmatch(rf"error: not enough disk space for {re.escape(str(disk))}/runs/x.pt \(it needs about [\d.]+ "
                        r"MB, [\d.]+ kB are free there\); nothing was written; free some space or choose another "
                        r"--out", lines[0]), err
    assert lines[1].startswith(f"error: not enough disk space for {disk}/s.pt (it needs about 200.7 kB"), err
    assert not out and list(disk.iterdir()) == []


def test_disk_full_while_training_says_what_to_resume(small_disk, work, monkeypatch, capsys):
    """Room for one checkpoint but not for the next save beside it: the run stops in one line
    naming the checkpoint that holds the last complete save and the command that resumes it."""
    from ddpm_tutorial.__main__ import _checkpoint_bytes, main
    disk = small_disk(int(_checkpoint_bytes(get_preset("quick").model) * 1.5 / 1024))
    monkeypatch.setenv("XDG_CACHE_HOME", str(work / "cache"))
    out = disk / "x.pt"
    assert main(["train", "--preset", "quick", "--data", str(work / "data"), "--subset", "16", "--batch-size", "8",
                 "--steps", "5", "--save-every", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: not enough disk space for {re.escape(str(out))} \(it needs about [\d.]+ MB, [\d.]+ "
                        rf"kB are free there\); {re.escape(str(out))} still holds its previous contents; free some "
                        rf"space, then resume with: python -m ddpm_tutorial train --resume {re.escape(str(out))} "
                        rf"--data {re.escape(str(work / 'data'))}", err), err
    assert load_checkpoint(out)["step"] == 1 and sorted(p.name for p in disk.iterdir()) == ["x.pt"]


def filling_the_disk(filler: Path, real):
    """``real`` wrapped to first fill the disk with ``filler`` (another program taking every free
    byte between a command's size check and its write)."""
    def write_on_a_filling_disk(*args, **kwargs):
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        return real(*args, **kwargs)
    return write_on_a_filling_disk


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert errors == lines[-1:], lines                    # progress bars above, then one error line
    return lines[-1]


def test_a_disk_that_fills_while_sample_writes_says_what_is_left(small_disk, work, monkeypatch, capsys):
    """Room for the outputs when `sample` checks, gone while it writes them (another program filled
    the disk meanwhile): one line, exit 1, saying what is left. The earlier PNG that --force would
    replace is still whole; a PNG written before the tensor ran out of room is said to be written;
    no temporary file."""
    import matplotlib.pyplot as plt

    from ddpm_tutorial.__main__ import main
    disk = small_disk(512)
    filler = disk / "other-program.bin"
    filling = functools.partial(filling_the_disk, filler)

    again = "; free some space, or choose another path, and sample again (the same --seed gives the same images)"
    old = disk / "grid.png"
    old.write_bytes(b"an earlier grid")
    with monkeypatch.context() as m:
        m.setattr(plt, "imsave", filling(plt.imsave))
        assert main(["sample", "--checkpoint", str(work / "good.pt"), "--n", "4", "--ddim-steps", "2",
                     "--png", str(old), "--force"]) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"error: disk full: cannot write {old} (") and \
        line.endswith(f"); {old} still holds its previous contents{again}"), line
    assert old.read_bytes() == b"an earlier grid"
    assert sorted(p.name for p in disk.iterdir()) == ["grid.png", filler.name]     # no temporary file

    filler.unlink()
    new_png, tensor = disk / "new.png", disk / "samples.pt"
    with monkeypatch.context() as m:
        m.setattr(torch, "save", filling(torch.save))
        assert main(["sample", "--checkpoint", str(work / "good.pt"), "--n", "4", "--ddim-steps", "2",
                     "--png", str(new_png), "--tensor", str(tensor)]) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"error: disk full: cannot write {tensor} (") and \
        line.endswith(f"); {tensor} was not written ({new_png} written){again}"), line
    assert new_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not tensor.exists()
    assert sorted(p.name for p in disk.iterdir()) == ["grid.png", "new.png", filler.name]


def test_a_disk_that_fills_before_the_export_json_says_the_onnx_was_written(small_disk, work, monkeypatch,
                                                                           capsys):
    """export-onnx writes the network, then the JSON that belongs to it; a disk that fills between
    the two: one line saying the ONNX file was written and the JSON not, so export again."""
    import json

    from ddpm_tutorial.__main__ import main
    disk = small_disk(8192)
    filler, onnx, info = disk / "other-program.bin", disk / "m.onnx", disk / "m.json"
    monkeypatch.setattr(json, "dumps", filling_the_disk(filler, json.dumps))
    assert main(["export-onnx", "--checkpoint", str(work / "good.pt"), "--out", str(onnx),
                 "--schedule-json", str(info)]) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"error: disk full: cannot write {info} (") and line.endswith(
        f"); {info} was not written, while {onnx} was written: the two belong together, so free some space and "
        "export again"), line
    assert onnx.stat().st_size > 0 and sorted(p.name for p in disk.iterdir()) == ["m.onnx", filler.name]


def test_a_read_only_folder_is_refused_with_what_to_do(small_disk, work, capsys):
    from ddpm_tutorial.__main__ import main
    disk = small_disk(64, read_only=True)
    for argv in (["sample", "--checkpoint", str(work / "good.pt"), "--png", str(disk / "x.png")],
                 ["export-onnx", "--checkpoint", str(work / "good.pt"), "--out", str(disk / "m" / "model.onnx")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        flag = argv[-2]
        assert err.startswith(f"error: cannot write {argv[-1]}: Read-only file system (in {disk}); choose a folder "
                              f"you can write to for {flag}") and err.count("\n") == 1, err


# --- the guard itself ----------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_files_are_written_with_the_users_umask(tmp_path, mask):
    """A cluster group reads checkpoints as it reads the user's other files (mkstemp made 0600)."""
    from ddpm_tutorial.outputs import write_file
    previous = os.umask(mask)
    try:
        path = save_checkpoint(tmp_path / "c.pt", {"step": 0})
        other = write_file(tmp_path / "x.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == other.stat().st_mode & 0o777 == 0o666 & ~mask


def test_the_guard_creates_nothing_and_writes_through_links(tmp_path):
    from ddpm_tutorial.outputs import check_outputs, write_file
    target = tmp_path / "real.bin"
    target.write_bytes(b"old")
    (tmp_path / "link.bin").symlink_to(target)
    assert check_outputs({"--out": tmp_path / "a" / "b" / "c.bin"}) == {"--out": tmp_path / "a" / "b" / "c.bin"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.bin", "real.bin"]       # no folder, no probe left
    with pytest.raises(ValueError, match="--out .*link.bin is the --in file itself"):
        check_outputs({"--out": tmp_path / "link.bin"}, inputs={"--in": target}, force=True)
    write_file(tmp_path / "link.bin", lambda f: f.write(b"new"))
    assert (tmp_path / "link.bin").is_symlink() and target.read_bytes() == b"new"        # the link stays a link
