"""Running a chapter's write-it cells inside a test, with the solution as written or with one
typical mistake put in, to see the chapter's own check cell pass or fail.

Used by tests/test_write_it*.py:

    nb = chapter("01_forward_process")
    ns = namespace(nb)                                   # the chapter's import cell, quick preset
    solution = code_cell(nb, "def my_q_sample(")         # the cell holding the solution
    run(solution.source, ns); run(next_code_cell(nb, solution).source, ns)    # passes
    broken = mutate(solution.source, "(1 - ab).sqrt()", "(1 - ab)")          # one typical mistake
    run(broken, ns)
    with pytest.raises(Mismatch): run(next_code_cell(nb, solution).source, ns)

Cells run in the test's own process (no kernel): each write-it check takes milliseconds.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import nbformat

ROOT = Path(__file__).resolve().parents[1]
SETUP_MARK = "# Colab set-up"


def chapter(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)


def code_cell(nb, text: str):
    """The one code cell whose source contains ``text``."""
    found = [c for c in nb.cells if c.cell_type == "code" and text in c.source]
    assert len(found) == 1, f"{len(found)} code cells contain {text!r}; expected exactly one"
    return found[0]


def next_code_cell(nb, cell):
    """The code cell after ``cell`` (a write-it's check follows its solution)."""
    i = nb.cells.index(cell)
    return next(c for c in nb.cells[i + 1:] if c.cell_type == "code")


def run(source: str, ns: dict) -> dict:
    """Execute a cell's source in ``ns`` (IPython syntax such as %magics translated first)."""
    from IPython.core.inputtransformer2 import TransformerManager
    exec(compile(TransformerManager().transform_cell(source), "<cell>", "exec"), ns)
    return ns


def namespace(nb) -> dict:
    """A fresh namespace holding what the chapter's import cell (its first code cell after the
    Colab set-up cell) defines, run in quick mode with a non-interactive matplotlib."""
    matplotlib.use("Agg")
    code = [c for c in nb.cells if c.cell_type == "code" and not c.source.startswith(SETUP_MARK)]
    ns = {"__name__": "__chapter__"}
    saved = os.environ.get("DDPM_QUICK")
    os.environ["DDPM_QUICK"] = "1"          # the preset the cell picks; restored for the other tests
    try:
        return run(code[0].source, ns)
    finally:
        if saved is None:
            del os.environ["DDPM_QUICK"]
        else:
            os.environ["DDPM_QUICK"] = saved


def mutate(source: str, old: str, new: str) -> str:
    """``source`` with ``old`` replaced by ``new``; ``old`` must occur exactly once, so a test
    fails loudly when the solution it breaks has been rewritten."""
    count = source.count(old)
    assert count == 1, f"{old!r} occurs {count} times in the solution; update the mistake to the current code"
    return source.replace(old, new)
