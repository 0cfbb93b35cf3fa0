"""What every benchmark script shares: device and threads, timing, the run record, JSON, tables.

Only the standard library and torch are imported at the top: ``speed.py --before`` runs its
timing worker under a previous commit's package, so the package is imported inside functions.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def add_run_args(parser) -> None:
    """The flags every script takes: where to run and where to write the JSON record."""
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own, which honours OMP_NUM_THREADS)")
    parser.add_argument("--json", help="write the results here")


def setup(args) -> torch.device:
    """Apply ``--threads`` and return the device ``--device`` names (default: CUDA when available)."""
    from ddpm_tutorial.config import resolve_device
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def with_sets(cfg, sets: dict):
    """``cfg`` (a frozen config) with the ``FIELD=VALUE`` items of ``sets`` that it has, each read as
    its default's type (tuples written 1-1-2, booleans true/false)."""
    def parse(text: str, default):
        if isinstance(default, tuple):
            return tuple(int(v) for v in text.split("-"))
        return text.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(text)
    return dataclasses.replace(cfg, **{k: parse(v, getattr(cfg, k)) for k, v in sets.items() if hasattr(cfg, k)})


def sync(device) -> None:
    """Wait for queued GPU work, so a timer measures the work and not only its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(fn(), seconds), synchronised before and after on CUDA."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def draw_samples(model, schedule, method: str, n: int, steps: int, seed: int, device, batch: int = 250,
                 clip_x0: bool = False, eta: float = 0.0):
    """n samples by ``method`` ("ddpm": Algorithm 2 over all T steps; "ddim" or "dpm++2m" in
    ``steps`` network calls) in chunks of ``batch`` (memory only), from the x_T that one draw
    seeded by ``seed`` gives; DDPM's chunks share that generator for their noise. Deterministic
    samplers give the same images for any ``batch`` up to float rounding (DDPM does not).
    ``clip_x0``: clamp every step's hat-x_0 to [-1, 1]; ``eta``: DDIM's eta. Returns (images (n, 1, 28, 28), seconds)."""
    from ddpm_tutorial.sampling import ddpm_sample, sample
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn((n, 1, 28, 28), generator=generator)

    def run():
        out = []
        for x in x_T.split(batch):
            kwargs = dict(device=device, progress=False, generator=generator, x_T=x, clip_x0=clip_x0)
            out.append((ddpm_sample(model, schedule, len(x), **kwargs) if method == "ddpm" else
                        sample(model, schedule, method, len(x), steps, eta=eta, **kwargs)).images)
        return torch.cat(out)
    return timed(run, device)


def _git(*args) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def run_record(device) -> dict:
    """What produced a result: hardware, versions, the package's commit, the command, the date."""
    from ddpm_tutorial.runinfo import hardware_summary
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--", "ddpm_tutorial", "bench"):
        commit += " (with uncommitted changes)"
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "denoising-diffusion-pytorch"):   # the peers' libraries, when installed
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return {"hardware": hardware_summary(device), "versions": versions, "commit": commit,
            "command": shlex.join(["python", str(script), *sys.argv[1:]]),
            "date": datetime.date.today().isoformat()}


def write_json(path, data) -> None:
    """Write ``data`` (after each set-up, so a crash keeps what was done)."""
    if path:
        Path(path).write_text(json.dumps(data, indent=1) + "\n")


def read_json(paths, key: str = "results") -> list:
    """The ``key`` lists of several JSON files written by :func:`write_json`, concatenated."""
    return [row for path in paths for row in json.loads(Path(path).read_text())[key]]


def print_header(records: list) -> None:
    """The distinct hardware, versions and commands behind a table (several when merged)."""
    for key in ("hardware", "versions", "commit", "command"):
        for value in dict.fromkeys(json.dumps(r.get(key)) for r in records):
            print(f"{key}: {json.loads(value)}")


def print_table(header: list, rows: list) -> None:
    """A markdown table: one header row, then one row per list of cells."""
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def fd_cell(q: dict) -> str:
    """'99.2 ± 3.1': a Frechet distance with its bootstrap spread (``SampleQuality.as_dict()``)."""
    return f"{q['fd']:.1f} ± {q['fd_std']:.1f}" if "fd_std" in q else f"{q['fd']:.1f}"


def log(*parts) -> None:
    """Progress on stderr, so stdout keeps only the tables."""
    print(*parts, file=sys.stderr, flush=True)
