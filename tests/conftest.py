"""Shared fixtures. The book is built once per test run, into _build/ (where the README's
`make book` writes too), by whichever xdist worker asks first; the other waits and reuses it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]

# Two xdist workers on two cores: one thread each. With more, OpenMP threads of the two
# processes spin against each other and the suite runs several times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_configure(config):
    for marker in ("browser: drives headless Chromium over the built book",
                   "book: builds the Jupyter Book",
                   "slow: takes more than a few seconds"):
        config.addinivalue_line("markers", marker)


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
