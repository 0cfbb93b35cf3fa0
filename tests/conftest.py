"""Shared fixtures: tiny configs and data, the oracle denoisers the sampler tests use, and the
book build. The book is built once per test run, into _build/ (where the README's `make book`
writes too), by whichever xdist worker asks first; the other waits and reuses it."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from filelock import FileLock
from torch import nn

from ddpm_tutorial.config import DiffusionConfig, ModelConfig, Preset, TrainConfig, get_preset

ROOT = Path(__file__).resolve().parents[1]

# Two xdist workers on two cores: one thread each. With more, OpenMP threads of the two
# processes spin against each other and the suite runs several times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


# --- small models, data and presets ------------------------------------------------------

TINY = ModelConfig(image_size=8, base_channels=8, channel_mults=(1, 2), groups=4)


@pytest.fixture
def tiny_config() -> ModelConfig:
    """A U-Net for 8x8 images with two levels: builds and runs in milliseconds."""
    return TINY


def random_images(n: int = 32, size: int = 8, seed: int = 0, channels: int = 1) -> torch.Tensor:
    """The tests' one image factory: n images (n, channels, size, size) uniform in [-1, 1], seeded.
    (Test modules import it and the tiny preset: ``from conftest import TINY, random_images, small_preset``.)"""
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def tiny_images():
    """Factory: ``tiny_images(n=32, size=8, seed=0, channels=1)`` -> (n, channels, size, size) in [-1, 1]."""
    return random_images


def small_preset(model: ModelConfig = TINY, T: int = 100, **train) -> Preset:
    """The tests' one tiny preset: the quick preset with a tiny model, a short diffusion and a
    few-step training recipe (``train`` overrides TrainConfig fields): what ``build_trainer``
    tests train, in one process or several (tests/test_distributed.py's workers import it)."""
    recipe = dict(steps=4, batch_size=8, warmup_steps=2, num_t_buckets=5, ema_decay=0.9)
    recipe.update(train)
    return dataclasses.replace(get_preset("quick"), model=model, diffusion=DiffusionConfig(T=T),
                               train=TrainConfig(**recipe))


@pytest.fixture
def make_preset():
    """Factory: ``make_preset(model=TINY, T=100, **train_fields)`` -> a frozen Preset."""
    return small_preset


# --- oracle denoisers --------------------------------------------------------------------

class _EpsModel(nn.Module):
    """What the samplers need of a model besides forward: a ``config`` (image shape) and a
    parameter (to find the device)."""

    def __init__(self, image_size: int, channels: int = 1):
        super().__init__()
        self.config = ModelConfig(image_size=image_size, in_channels=channels, base_channels=8,
                                  channel_mults=(1,), groups=4)
        self.dummy = nn.Parameter(torch.zeros(()))


class OracleEps(_EpsModel):
    """eps_theta that knows the one data point x_0:

        eps(x_t, t) = (x_t - sqrt(bar-alpha_t) x_0) / sqrt(1 - bar-alpha_t)

    With it, every exact sampler must return x_0 itself, and L_simple is 0."""

    def __init__(self, schedule, x0: torch.Tensor):
        super().__init__(x0.shape[-1], x0.shape[1])
        self.schedule, self.x0 = schedule, x0

    def forward(self, xt, t):
        s = self.schedule
        return ((xt - s.sqrt_alpha_bar[t].reshape(-1, 1, 1, 1) * self.x0)
                / s.sqrt_one_minus_alpha_bar[t].reshape(-1, 1, 1, 1))


class OracleV(OracleEps):
    """v_theta that knows the one data point x_0 (Salimans & Ho 2022):

        v(x_t, t) = sqrt(bar-alpha_t) eps(x_t, t) - sqrt(1 - bar-alpha_t) x_0

    with the oracle's eps; at bar-alpha_T = 0 (zero terminal SNR) it is -x_0."""

    def forward(self, xt, t):
        s = self.schedule
        a, sigma = (c[t].reshape(-1, 1, 1, 1) for c in (s.sqrt_alpha_bar, s.sqrt_one_minus_alpha_bar))
        return a * super().forward(xt, t) - sigma * self.x0


class GaussianDataEps(_EpsModel):
    """The exact eps-prediction when the data is Gaussian, x_0 ~ N(m, s^2 I) per pixel:

        eps(x_t, t) = E[eps | x_t] = sqrt(1 - ab_t) (x_t - sqrt(ab_t) m) / (ab_t s^2 + 1 - ab_t)

    computed in float64 from ``alpha_bar`` (float64, (T,)) and returned in x's dtype. Unlike
    :class:`OracleEps` its hat-x_0 changes along the chain, so a second-order solver's
    correction matters. Its probability-flow ODE is known in closed form: the standardised
    value w = (x_t - sqrt(ab_t) m) / sqrt(ab_t s^2 + 1 - ab_t) stays constant, so the ODE
    maps x_T to x_0 = m + s w (:meth:`ode_solution`). ``t`` may be (B,) or a 0-dim tensor."""

    def __init__(self, alpha_bar: torch.Tensor, m: torch.Tensor, s: float):
        super().__init__(m.shape[-1], m.shape[1])
        self.alpha_bar, self.m, self.s = alpha_bar.double(), m.double(), float(s)

    def forward(self, xt, t):
        ab = self.alpha_bar[t.reshape(-1).long().cpu()].reshape(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (xt.double() - ab.sqrt() * self.m) / (ab * self.s ** 2 + 1 - ab)
        return eps.to(xt.dtype)

    def ode_solution(self, x_T: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar[-1]
        w = (x_T.double() - ab.sqrt() * self.m) / (ab * self.s ** 2 + 1 - ab).sqrt()
        return self.m + self.s * w


@pytest.fixture
def oracle():
    """Factory: ``oracle(schedule, x0)`` -> the denoiser that knows x_0 (:class:`OracleEps`)."""
    return OracleEps


@pytest.fixture
def oracle_v():
    """Factory: ``oracle_v(schedule, x0)`` -> the v-prediction network that knows x_0 (:class:`OracleV`)."""
    return OracleV


@pytest.fixture
def gaussian_eps():
    """Factory: ``gaussian_eps(alpha_bar, m, s)`` -> :class:`GaussianDataEps`."""
    return GaussianDataEps


# --- the book ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def book_build(request):
    """Build the book with warnings as errors, once per test run even with several xdist
    workers (a file lock, and a stamp naming the run); returns (returncode, output, html dir)."""
    run_id = getattr(request.config, "workerinput", {}).get("testrunuid", str(os.getpid()))
    html = ROOT / "_build" / "html"
    stamp = ROOT / "_build" / ".test-build.json"
    (ROOT / "_build").mkdir(exist_ok=True)
    with FileLock(str(ROOT / "_build" / ".test-build.lock")):
        if stamp.exists():
            record = json.loads(stamp.read_text())
            if record["run"] == run_id:
                return record["code"], record["output"], html
        jb = Path(sys.executable).with_name("jupyter-book")
        cmd = [str(jb), "build", str(ROOT), "--warningiserror", "--keep-going"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        output = proc.stdout + proc.stderr
        stamp.write_text(json.dumps({"run": run_id, "code": proc.returncode, "output": output}))
        return proc.returncode, output, html


@pytest.fixture(scope="session")
def built_book(book_build):
    code, output, html = book_build
    if code != 0:
        pytest.fail(f"jupyter-book build failed (exit {code}):\n{output[-4000:]}")
    return html


# --- the chapters' executions: who reuses whose runs/ ----------------------------------------
# A chapter keeps what it made under runs/ next to it (chapter 4's checkpoint, sample sets, the
# ablation's runs), and reads it back rather than making it again: chapters that sample from
# chapter 4's model (``chapter_model``) load runs/04_training_quick.pt, and each practice
# notebook (tests/test_practice.py) runs its cells in the chapters' folder. So a chapter's
# execution (nbmake) comes before the practice test of that chapter, and chapter 4's before
# those of the chapters that sample from it: in collection order (below), and on one xdist
# worker as one unit of work, longest first (``--dist loadgroup``, as `make test` runs; the
# scheduler below, since xdist's own groups do not reach pytest 9's node ids). What any of these
# tests proves does not depend on the order: only how much is computed twice.

def _code(path: Path) -> str:
    return "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


def execution_chains(chapters: list[Path]) -> dict[str, str]:
    """{chapter stem: the stem of the chapter whose runs/ it reads}: itself, or the chapter that
    writes the reader's checkpoint (``reader_checkpoint_path``) for those that load it
    (``chapter_model``)."""
    code = {p.stem: _code(p) for p in chapters}
    writer = next((s for s, text in code.items() if "reader_checkpoint_path(" in text), None)
    return {s: writer if writer and "chapter_model(" in text else s for s, text in code.items()}


PRACTICE_TEST = "tests/test_practice.py::test_practice_notebook_stops_at_its_first_blank["


def chapter_of(nodeid: str) -> tuple[str, int] | None:
    """(chapter stem, 0 for the chapter's execution or 1 for its practice notebook's), or None."""
    if nodeid.startswith("notebooks/") and nodeid.endswith(".ipynb"):
        return Path(nodeid.split("::")[0]).stem, 0
    if nodeid.startswith(PRACTICE_TEST):
        return nodeid[len(PRACTICE_TEST):].split("]")[0], 1
    return None


@functools.lru_cache(maxsize=None)       # the hooks and tests of one process ask several times
def _chains() -> dict[str, str]:
    return execution_chains(sorted((ROOT / "notebooks").glob("*.ipynb")))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    chains = _chains()
    keyed = {}
    for item in items:
        found = chapter_of(item.nodeid)
        if found and found[0] in chains:
            keyed[item] = (chains[found[0]], found[1], found[0])
    chained = sorted(keyed, key=keyed.get)       # per chain: executions in chapter order, then practice
    items[:] = chained + [item for item in items if item not in keyed]


@pytest.hookimpl(optionalhook=True)   # an xdist hook: without xdist (-p no:xdist) it is never called
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    chains = _chains()

    class ChainScheduling(LoadGroupScheduling):
        """Each chain of executions is one unit of work, run in collection order on one worker;
        every other test is a unit of its own (or of its xdist_group). Units with the most tests
        go first (xdist's reordering), which puts the longest chains first."""

        def _split_scope(self, nodeid: str) -> str:
            found = chapter_of(nodeid)
            if found and found[0] in chains:
                return f"runs-{chains[found[0]]}"
            return super()._split_scope(nodeid)

    return ChainScheduling(config, log)
