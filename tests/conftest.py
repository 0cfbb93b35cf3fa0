"""Shared fixtures. The book is built once per test session, into _build/ (the README's
`make book` target writes there too), by whichever xdist worker runs the `book` group."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    for marker in ("browser: drives headless Chromium over the built book",
                   "book: builds the Jupyter Book",
                   "slow: takes more than a few seconds"):
        config.addinivalue_line("markers", marker)


def pytest_collection_modifyitems(items):
    # Every test that needs the built book runs on one xdist worker (--dist loadgroup),
    # so the book is built once and never by two processes into the same folder.
    for item in items:
        if "built_book" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("book"))


@pytest.fixture(scope="session")
def book_build():
    """Build the book with warnings as errors; returns (returncode, combined output, html dir)."""
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(ROOT), "--warningiserror", "--keep-going"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return proc.returncode, proc.stdout + proc.stderr, ROOT / "_build" / "html"


@pytest.fixture(scope="session")
def built_book(book_build):
    code, output, html = book_build
    if code != 0:
        pytest.fail(f"jupyter-book build failed (exit {code}):\n{output[-4000:]}")
    return html
