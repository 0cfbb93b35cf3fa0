"""Distributed training with PyTorch's own engine: torchrun starts the processes, this module
reads what torchrun tells each of them, and the trainer's one loop does the rest (DDP).

    python -m ddpm_tutorial train ...                                  # world size 1: no process group
    torchrun --nproc_per_node=8 -m ddpm_tutorial train ...            # 8 processes on one machine
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \
             --nproc_per_node=8 -m ddpm_tutorial train ...            # and --node_rank=1 on the other

torchrun sets, in every process: ``RANK`` (0 .. WORLD_SIZE-1, unique in the job),
``LOCAL_RANK`` (0 .. processes on this machine - 1: which GPU to take), ``WORLD_SIZE``,
``MASTER_ADDR`` / ``MASTER_PORT`` (where rank 0's store listens). :func:`init` reads them and
joins the process group: NCCL when the processes drive GPUs, gloo on the CPU. Without
torchrun (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) nothing is initialised and every helper
answers as for one process, so the same script runs on a laptop unchanged.

Rank 0 alone logs, saves and shows progress (:func:`is_main`); every rank computes.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

# How long a collective waits for a silent peer before failing. A peer that dies closes its
# sockets and the survivors fail at once; this bounds the wait for one that hangs instead.
TIMEOUT = datetime.timedelta(minutes=10)


class PeerFailure(RuntimeError):
    """A rank of a distributed run stopped: another rank died, a collective failed, or torchrun
    (or SLURM) stopped this process with SIGTERM."""


@dataclass(frozen=True)
class Context:
    """What one process knows of the job: ``rank`` in [0, world_size), ``local_rank`` on this
    machine, the ``device`` it computes on and the ``backend`` (None: one process, no group)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None


# How long a process started by hand (WORLD_SIZE set without torchrun) waits for the others
# to join before it stops with a message; DDPM_JOIN_TIMEOUT (seconds) changes it. torchrun
# starts every process itself, so its jobs never wait for one that does not exist.
JOIN_TIMEOUT_SECONDS = 300


def env_int(name: str, default: int, lo: int = 0, hi: int | None = None) -> int:
    """An integer environment variable in [lo, hi], ``default`` when unset or empty; a
    ValueError naming the variable otherwise (torchrun sets them; a hand-set one may be anything)."""
    value = os.environ.get(name, "")
    try:
        number = int(value) if value.strip() else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (torchrun sets it); "
                         f"unset it to train in one process") from None
    if number < lo or (hi is not None and number > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"environment variable {name}={value!r} must be an integer {bound} (torchrun sets it)")
    return number


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset), checked: before a process group exists."""
    return env_int("WORLD_SIZE", 1, lo=1)


def _join_timeout() -> datetime.timedelta:
    value = os.environ.get("DDPM_JOIN_TIMEOUT", "")
    try:
        seconds = float(value) if value.strip() else JOIN_TIMEOUT_SECONDS
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"environment variable DDPM_JOIN_TIMEOUT={value!r} must be a number of seconds > 0")
    return datetime.timedelta(seconds=seconds)


def init(device=None, log=None) -> Context:
    """Join the job torchrun started, or return the one-process context when there is none.

    ``device``: None picks CUDA device ``LOCAL_RANK`` when CUDA is available, else the CPU.
    Every variable read is checked first (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
    Processes started by hand, without torchrun, meet at MASTER_ADDR:MASTER_PORT and wait at
    most DDPM_JOIN_TIMEOUT seconds for each other (``log`` says so once), then stop with a
    message instead of hanging. Calling it again in a process that already joined returns the
    same context."""
    world = world_size_from_env()
    rank, local = env_int("RANK", 0), env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world}); start the job with torchrun")
    if device is None:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    if world == 1:
        return Context(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)                 # before NCCL: each process owns one GPU
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k, "").strip()]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                             "not set: start the job with torchrun (it sets them), not by hand")
        port = env_int("MASTER_PORT", 0, lo=1, hi=65535)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":     # torchrun: its agent holds the store
            dist.init_process_group(backend, timeout=TIMEOUT)   # reads RANK, WORLD_SIZE, MASTER_* (env://)
        else:
            dist.init_process_group(backend, store=_join_by_hand(rank, world, port, log), rank=rank,
                                    world_size=world, timeout=TIMEOUT)
    return Context(rank, world, local, device, dist.get_backend())


def _join_by_hand(rank: int, world: int, port: int, log) -> dist.TCPStore:
    """The rendezvous of processes started by hand: rank 0 serves a TCPStore at MASTER_ADDR:MASTER_PORT
    and waits for the other WORLD_SIZE - 1; each of them connects to it. Both give up after the
    join timeout with one line saying what to do."""
    addr, timeout = os.environ["MASTER_ADDR"].strip(), _join_timeout()
    seconds = timeout.total_seconds()
    if log:
        log(f"rank {rank} of {world}: waiting up to {seconds:.0f} s for the other processes at {addr}:{port} "
            "(started without torchrun; DDPM_JOIN_TIMEOUT sets the wait)")
    try:
        with _quiet_stderr():          # c10d prints its connection retries, with C++ stack frames
            return dist.TCPStore(addr, port, world, rank == 0, timeout, wait_for_workers=True)
    except (RuntimeError, OSError) as err:       # DistStoreError, DistNetworkError, address in use
        text = " ".join(str(err).split())
        if "in use" in text.lower():
            raise PeerFailure(f"MASTER_PORT={port} is already in use on {addr}: choose another port") from None
        what = (f"the other {world - 1} process(es) did not join within {seconds:.0f} s" if rank == 0 else
                f"no answer from rank 0 at {addr}:{port} within {seconds:.0f} s")
        raise PeerFailure(f"{what} (WORLD_SIZE={world}, RANK={rank} set by hand, without torchrun): start every "
                          "process, or use torchrun, which starts them all; unset WORLD_SIZE to train in one "
                          f"process ({text[:160]})") from None


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to /dev/null inside the block (C++ logging writes there directly)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on the process that logs and saves: rank 0, or the only process."""
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (the others would repeat the same line world_size times)."""
    if is_main():
        print(*args, **kwargs)


def barrier() -> None:
    """Wait until every rank gets here; nothing to wait for in a one-process run."""
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def local_main_first():
    """Run the block on each machine's local rank 0 first, then on the other ranks there: for
    work that writes a shared cache (the Fashion-MNIST files), so processes do not race."""
    if not dist.is_initialized():
        yield
        return
    local = env_int("LOCAL_RANK", 0)
    if local != 0:
        dist.barrier()
    yield
    if local == 0:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (at the end of a run); harmless when there is none."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def sigterm_raises():
    """Turn SIGTERM into :class:`PeerFailure` inside the block, so a rank that torchrun stops
    (because another rank died) or that SLURM cancels still says what happened and where the
    last checkpoint is. A second SIGTERM kills as usual. Only the main thread can install it."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise PeerFailure("this process received SIGTERM (torchrun stops every rank when one fails; "
                          "a scheduler sends it on cancel or time-out)")
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:                                # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
