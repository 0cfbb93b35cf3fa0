"""What produced a result: the hardware and versions printed beside every chapter's outputs."""
from __future__ import annotations

import datetime
import platform
import time

import torch

from .config import Preset, resolve_device


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_summary(device=None) -> str:
    """One line naming the hardware, printed beside every result."""
    device = resolve_device(device)
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), " \
           f"{torch.get_num_threads()} threads, torch {torch.__version__}"


def describe_run(preset: Preset, device=None) -> str:
    """The line each chapter prints so its outputs say which preset and hardware produced them."""
    return (f"preset '{preset.name}' ({preset.description}) on {hardware_summary(device)}; "
            f"run {datetime.date.today().isoformat()}")


class ChapterClock:
    """The wall-clock time of one chapter's run: started in its first code cell, read in its last,
    so every chapter prints how long it really took on the hardware that :func:`describe_run` names
    (a measured time per preset instead of a promise)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def minutes(self) -> float:
        return (time.perf_counter() - self.start) / 60

    def __str__(self) -> str:
        return f"{self.minutes():.1f} min"
