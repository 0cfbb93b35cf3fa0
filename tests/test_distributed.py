"""Issue 17: the one training loop under torchrun (DDP, gloo, CPU, 127.0.0.1 only).

Each test launches real processes with the venv's torchrun (``python -m torch.distributed.run``):
two ranks end bit-identical and train the run one process trains (to float summation order),
a resume crosses world sizes both ways, two "nodes" meet by rendezvous and save once, and a
killed rank leaves a one-line message and a checkpoint that loads."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm_tutorial import distributed
from ddpm_tutorial.checkpoint import load_checkpoint
from conftest import random_images, small_preset
from ddpm_tutorial.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]

# The worker each rank runs: the tiny recipe below, resumed from argv[2] (a 1-process checkpoint
# at step 2), trained to step 4 (saved) and 6 (saved), then every rank dumps its own weights.
WORKER = '''
import dataclasses, sys, torch
from pathlib import Path
from ddpm_tutorial import distributed
from ddpm_tutorial.train import build_trainer
sys.path.insert(0, sys.argv[3])
from test_distributed import tiny_preset
out = Path(sys.argv[1])
ctx = distributed.init("cpu")
trainer = build_trainer(tiny_preset(), torch.load(out / "data.pt"), device="cpu").resume(sys.argv[2])
trainer.fit(steps=4, progress=False, checkpoint_path=out / "ck4.pt")
trainer.fit(steps=6, progress=False, checkpoint_path=out / "ck6.pt")
torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.module.state_dict(),
            "loss": trainer.history.loss, "buckets": trainer.history.t_bucket_count,
            "world": ctx.world_size}, out / f"rank{ctx.rank}.pt")
distributed.cleanup()
'''


def tiny_preset():
    """The tests' tiny preset (conftest.small_preset), trained 6 steps with Adam at 1e-3."""
    return small_preset(steps=6, lr=1e-3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "DDPM_DATA_DIR")}
    return {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DDPM_QUICK": "1"}


def torchrun(*args, nproc: int = 2, port: int | None = None, extra=()) -> list:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra,
            "--master_addr=127.0.0.1", f"--master_port={port or free_port()}", *map(str, args)]


def assert_states(a: dict, b: dict, exact: bool, what: str) -> None:
    for name, x in a.items():
        if exact:
            assert torch.equal(x, b[name]), f"{what}: {name} differs"
        else:
            torch.testing.assert_close(x, b[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {name}: {m}")


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_across_world_sizes(tmp_path):
    data = random_images()
    torch.save(data, tmp_path / "data.pt")
    one = build_trainer(tiny_preset(), data, device="cpu")              # the reference: 1 process, batch 8
    one.fit(steps=2, progress=False, checkpoint_path=tmp_path / "ck2.pt")
    one.fit(progress=False)                                               # to step 6
    (tmp_path / "worker.py").write_text(WORKER)

    # 1 -> 2 processes: resume the 1-process checkpoint of step 2 with 4 images per rank
    proc = subprocess.run(torchrun(tmp_path / "worker.py", tmp_path, tmp_path / "ck2.pt", Path(__file__).parent),
                          env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == 2

    # the two ranks hold bit-identical weights and EMA (all-reduced gradients, the same steps)
    assert_states(r0["model"], r1["model"], exact=True, what="rank 0 vs rank 1 weights")
    assert_states(r0["ema"], r1["ema"], exact=True, what="rank 0 vs rank 1 EMA")
    assert r0["loss"] == r1["loss"] and r0["buckets"] == r1["buckets"]

    # and they trained the run one process trains with the whole batch (float summation order only)
    assert_states(one.model.state_dict(), r0["model"], exact=False, what="1 process vs 2 (weights)")
    assert_states(one.ema.module.state_dict(), r0["ema"], exact=False, what="1 process vs 2 (EMA)")
    assert r0["loss"] == pytest.approx(one.history.loss, rel=1e-5)
    assert r0["buckets"] == one.history.t_bucket_count             # the history counts the global batch
    assert sum(r0["buckets"]) == 6 * 8
    assert not torch.equal(one.model.conv_in.weight, build_trainer(tiny_preset(), data).model.conv_in.weight)

    # 2 -> 1 process: the 2-process checkpoint of step 4 resumes in one process and trains the same run
    ck4 = load_checkpoint(tmp_path / "ck4.pt")
    assert ck4["step"] == 4 and ck4["config"]["train"]["batch_size"] == 8      # the global batch is stored
    back = build_trainer(tiny_preset(), data, device="cpu").resume(tmp_path / "ck4.pt")
    back.fit(progress=False)
    assert_states(one.model.state_dict(), back.model.state_dict(), exact=False, what="2 -> 1 resume vs 1 process")
    assert back.history.loss == pytest.approx(one.history.loss, rel=1e-5)
    assert load_checkpoint(tmp_path / "ck6.pt")["step"] == 6


def _image_folder(folder: Path, n: int = 24) -> Path:
    from PIL import Image
    g = torch.Generator().manual_seed(1)
    folder.mkdir()
    for i in range(n):
        pixels = (torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.slow
def test_two_node_rendezvous_on_loopback_trains_and_saves_once(tmp_path):
    """Two torchrun launches, one per "node" (--nnodes=2, --node_rank 0 and 1, static rendezvous at
    rank 0's address), each one process: one job of world size 2 through the real command line."""
    folder = _image_folder(tmp_path / "imgs")
    ck = tmp_path / "out" / "ck.pt"
    port = free_port()
    train = ["-m", "ddpm_tutorial", "train", "--images", folder, "--image-size", "16", "--steps", "3",
             "--batch-size", "8", "--save-every", "0", "--out", ck]
    nodes = [subprocess.Popen(torchrun(*train, nproc=1, port=port, extra=("--nnodes=2", f"--node_rank={i}")),
                              env=env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    for i, (node, (out, err)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {i}: {err[-3000:]}"
    text = "".join(out for out, _ in outputs)
    assert text.count("2 processes (gloo), 4 images each of a global batch of 8") == 1, text
    assert text.count("done: 3 steps") == 1, text                  # rank 0 alone reports and saves
    ckpt = load_checkpoint(ck)
    assert ckpt["step"] == 3 and ckpt["config"]["model"]["in_channels"] == 3
    assert sorted(p.name for p in ck.parent.iterdir()) == ["ck.pt"]   # one file, no temporaries left


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker torchrun (pid ``launcher``) started as ``rank``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


@pytest.mark.slow
def test_killed_rank_ends_the_job_with_one_line_and_a_loadable_checkpoint(tmp_path):
    """SIGKILL to rank 1 mid-run (the images streamed through the sharded DataLoader path):
    rank 0 stops with one line naming what happened and the last checkpoint, which loads."""
    folder = _image_folder(tmp_path / "imgs")
    ck = tmp_path / "ck.pt"
    cmd = torchrun("-m", "ddpm_tutorial", "train", "--images", folder, "--image-size", "16", "--steps", "100000",
                   "--batch-size", "8", "--save-every", "3", "--stream", "--workers", "0", "--out", ck)
    launcher = subprocess.Popen(cmd, env=env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        deadline = time.monotonic() + 120
        while not ck.exists() and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.2)
        assert ck.exists(), f"no checkpoint appeared: {launcher.communicate(timeout=30)[1][-3000:]}"
        time.sleep(1.0)                                      # a few more steps, maybe another save
        victim = _rank_pid(launcher.pid, 1)
        assert victim, "rank 1's process was not found"
        os.kill(victim, signal.SIGKILL)
        out, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    found = re.fullmatch(r"error: rank 0 of 2 stopped at step (\d+): another process of the job stopped or lost "
                         r"its connection \(.+\); the last checkpoint is (.+) \(step (\d+)\); resume from it with "
                         r"--resume (.+)", lines[0])
    assert found, lines[0]
    stopped, path, step = int(found[1]), Path(found[2]), int(found[3])
    assert path == ck and found[4] == str(ck) and step % 3 == 0 and 3 <= step <= stopped
    ckpt = load_checkpoint(ck)
    assert ckpt["step"] == step and "optimizer" in ckpt


def test_one_process_without_torchrun_needs_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.init("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, None)
    assert not torch.distributed.is_initialized() and distributed.is_main() and distributed.world_size() == 1
    distributed.barrier()                                    # nothing to wait for
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2 must lie in \[0, WORLD_SIZE=2\); start the job with torchrun"):
        distributed.init("cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but MASTER_ADDR is not set: start the job with torchrun"):
        distributed.init("cpu")


def test_a_global_batch_that_does_not_split_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """3 processes cannot share a global batch of 8 equally: one line, before any data is read
    or any process group is joined (what each of the 3 ranks would print)."""
    from ddpm_tutorial.__main__ import main
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert main(["train", "--preset", "quick", "--images", str(tmp_path), "--batch-size", "8",
                 "--out", str(tmp_path / "x.pt")]) == 1
    assert capsys.readouterr().err == ("error: rank 2 of 3: --batch-size 8 is the global batch, split evenly among "
                                       "the 3 processes; choose a multiple of 3\n")
    assert not torch.distributed.is_initialized() and not (tmp_path / "x.pt").exists()


# --- the environment, read and checked ----------------------------------------------------------------

ENVIRONMENTS = [
    ({"WORLD_SIZE": "abc"}, "error: environment variable WORLD_SIZE='abc' must be an integer (torchrun sets it); "
                            "unset it to train in one process"),
    ({"WORLD_SIZE": "0"}, "error: environment variable WORLD_SIZE='0' must be an integer >= 1 (torchrun sets it)"),
    ({"WORLD_SIZE": "2", "RANK": "x"}, "error: environment variable RANK='x' must be an integer"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "error: rank 0 of 2: environment variable LOCAL_RANK='-1' must be an "
                                              "integer >= 0"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"},
     "error: rank 0 of 2: environment variable MASTER_PORT='abc' must be an integer"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"},
     "error: rank 0 of 2: environment variable MASTER_PORT='70000' must be an integer in [1, 65535]"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "{port}", "DDPM_JOIN_TIMEOUT": "soon"},
     "error: rank 0 of 2: environment variable DDPM_JOIN_TIMEOUT='soon' must be a number of seconds > 0"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "{port}", "DDPM_JOIN_TIMEOUT": "1"},
     "error: rank 0 of 2: the other 1 process(es) did not join within 1 s (WORLD_SIZE=2, RANK=0 set by hand, without "
     "torchrun): start every process, or use torchrun, which starts them all; unset WORLD_SIZE to train in one "
     "process"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "{port}", "DDPM_JOIN_TIMEOUT": "1"},
     "error: rank 1 of 2: no answer from rank 0 at 127.0.0.1:{port} within 1 s"),
]


@pytest.mark.parametrize("variables, message", ENVIRONMENTS)
def test_every_environment_variable_is_checked(tmp_path, monkeypatch, capsys, variables, message):
    """What torchrun sets, set by hand or by mistake: one line naming the variable, before any data
    is read; a hand-set world size whose other process never starts waits DDPM_JOIN_TIMEOUT, then says so."""
    from ddpm_tutorial.__main__ import main
    port = str(free_port())
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DDPM_JOIN_TIMEOUT",
                 "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value.format(port=port))
    start = time.monotonic()
    assert main(["train", "--preset", "quick", "--images", str(tmp_path), "--batch-size", "8",
                 "--out", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(message.format(port=port)), err
    assert all(line.startswith("rank ") and "waiting up to 1 s" in line for line in err[:-1]), err   # the one note
    assert time.monotonic() - start < 30
    assert not torch.distributed.is_initialized() and not (tmp_path / "x.pt").exists()


def test_a_master_port_in_use_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    """Rank 0 started by hand on a port another program listens on: one line naming the port and
    what to do, at once (not after the join timeout), and nothing written."""
    from ddpm_tutorial.__main__ import main
    for name in ("LOCAL_RANK", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for name, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                            "DDPM_JOIN_TIMEOUT": "20"}.items():
            monkeypatch.setenv(name, value)
        start = time.monotonic()
        assert main(["train", "--preset", "quick", "--images", str(tmp_path), "--batch-size", "8",
                     "--out", str(tmp_path / "x.pt")]) == 1
        elapsed = time.monotonic() - start
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"error: rank 0 of 2: MASTER_PORT={port} is already in use on 127.0.0.1: choose another port", err
    assert elapsed < 10, f"took {elapsed:.0f} s: the busy port should be reported at once, not after the join timeout"
    assert not torch.distributed.is_initialized() and not (tmp_path / "x.pt").exists()


HAND_STARTED = '''
from ddpm_tutorial import distributed
ctx = distributed.init("cpu")
distributed.barrier()
print(ctx.rank, ctx.world_size, ctx.backend)
distributed.cleanup()
'''


@pytest.mark.slow
def test_processes_started_by_hand_meet_without_torchrun(tmp_path):
    """WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT set by hand in two shells: the two processes
    meet at rank 0's store (no torchrun agent) and form one gloo group."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", HAND_STARTED], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env(), "WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                                              "MASTER_PORT": port, "DDPM_JOIN_TIMEOUT": "60"})
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outputs]
    assert [o.split() for o, _ in outputs] == [["0", "2", "gloo"], ["1", "2", "gloo"]]
