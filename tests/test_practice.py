"""The practice notebooks (practice/): each chapter with its marked solutions blanked by
tools/make_practice.py (nbgrader's ClearSolutions through nbconvert), committed so that Colab
can open them from GitHub.

For every chapter: the committed practice notebook is what the tool makes of the chapter now;
putting the chapter's solutions back into its blanks gives the chapter's cells again; it holds
no solution, no marker and no output; and, executed in quick mode, it runs up to its first
blank and stops there with NotImplementedError (in the blank, or in the check that calls what the
blank leaves unwritten), where the chapter's own cells run.

The practice notebooks run in the chapters' folder, notebooks/: the cells before a first blank are
the chapter's own (test_solutions_put_back_give_the_chapter), so they read back what the chapter's
execution left in runs/ (chapter 4's checkpoint, sample sets, the ablation's runs) instead of making
it again; tests/conftest.py runs each chapter before its practice notebook on one worker.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_practice  # noqa: E402
from make_practice import BEGIN, END, STUB, blanks, practice_path, put_back, solution_regions  # noqa: E402

CHAPTERS = sorted((ROOT / "notebooks").glob("*.ipynb"))
by_chapter = pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
FIX = "run: python tools/make_practice.py"


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def committed_practice(path: Path) -> nbformat.NotebookNode:
    target = practice_path(path)
    assert target.is_file(), f"{target.relative_to(ROOT)} is missing; {FIX}"
    return read(target)


# --- the chapters: marked, and only where ClearSolutions reads markers ----------------------------


@by_chapter
def test_chapter_marks_at_least_one_solution(path):
    nb = read(path)
    problems = make_practice.marker_problems(nb)
    assert not problems, f"{path.name}: " + "; ".join(problems)
    assert solution_regions(nb), (f"{path.name}: no code cell holds a region between {BEGIN!r} and {END!r}: "
                                  "the chapter has nothing for the reader to write")


@by_chapter
def test_every_solution_cell_is_marked(path):
    """A cell tagged "solution" (an exercise's answer) shows its answer in Jupyter and Colab
    unless its code is marked: then the practice notebook blanks it."""
    nb = read(path)
    unmarked = [i for i, c in enumerate(nb.cells)
                if "solution" in c.get("metadata", {}).get("tags", []) and BEGIN not in c.source]
    assert not unmarked, f"{path.name}: solution cells {unmarked} have no {BEGIN!r} ... {END!r} region"


# --- the committed practice notebooks ---------------------------------------------------------------


@by_chapter
def test_practice_notebook_is_up_to_date(path):
    target = practice_path(path)
    assert target.is_file(), f"{target.relative_to(ROOT)} is missing; {FIX}"
    assert target.read_text() == make_practice.practice_text(path), \
        f"{target.relative_to(ROOT)} is not what the tool makes of {path.name} now; {FIX}"


def test_no_practice_notebook_without_its_chapter():
    names = {p.name for p in CHAPTERS}
    orphans = [p.name for p in (ROOT / "practice").glob("*.ipynb") if p.name not in names]
    assert not orphans, f"practice notebooks of no chapter: {orphans}; {FIX}"


@by_chapter
def test_solutions_put_back_give_the_chapter(path):
    chapter = read(path)
    back = put_back(committed_practice(path), solution_regions(chapter))
    assert [c.cell_type for c in back.cells] == [c.cell_type for c in chapter.cells]
    differ = [i for i, (a, b) in enumerate(zip(back.cells, chapter.cells)) if a.source != b.source]
    assert not differ, f"{path.name}: with the solutions put back, cells {differ} still differ from the chapter"


@by_chapter
def test_practice_notebook_leaks_no_solution(path):
    chapter, practice = read(path), committed_practice(path)
    text = practice_path(path).read_text()
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    with_outputs = [i for i, c in enumerate(practice.cells)
                    if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not with_outputs, f"practice/{path.name}: cells {with_outputs} keep outputs (answers printed or drawn)"
    # Every line of a solution that the chapter writes nowhere else must be absent, in any form.
    regions = solution_regions(chapter)
    elsewhere = "\n".join(_outside_regions(c.source) for c in chapter.cells)
    secret = {line.strip() for _, region in regions for line in region[1:-1]}
    secret = {s for s in secret if len(s) >= 12 and s not in elsewhere}
    leaked = sorted(s for s in secret if json.dumps(s)[1:-1] in text or s in text)
    assert not leaked, f"practice/{path.name} contains solution lines: {leaked[:5]}"
    assert len(blanks(practice)) == len(regions)


def _outside_regions(source: str) -> str:
    keep, inside = [], False
    for line in source.split("\n"):
        if line.strip() == BEGIN:
            inside = True
        elif line.strip() == END:
            inside = False
        elif not inside:
            keep.append(line)
    return "\n".join(keep)


@pytest.fixture(scope="module")
def kernel():
    """One quick-mode kernel for all the chapters of this module (a fresh kernel per chapter
    would cost seconds each): each test starts by clearing its namespace. It works in the
    chapters' folder, where their runs/ are (see the module's docstring)."""
    import os

    from nbclient import NotebookClient

    saved = {k: os.environ.get(k) for k in ("DDPM_QUICK", "MPLBACKEND")}
    os.environ.update(DDPM_QUICK="1", MPLBACKEND="Agg")     # the kernel inherits them at start
    client = NotebookClient(nbformat.v4.new_notebook(), timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})
    try:
        with client.setup_kernel():
            yield client
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
@by_chapter
def test_practice_notebook_stops_at_its_first_blank(path, kernel):
    """Executed in quick mode, the practice notebook runs every cell before its first blank and
    then raises NotImplementedError: in the blank itself, or in the cell that first calls the
    function the blank leaves unwritten (the blank is real). The chapter's own versions of those
    cells then run in the same kernel: the blank was all that was missing. Only the cells up to
    that point run, so the test stays cheap wherever the blank is."""
    from nbclient.exceptions import CellExecutionError

    chapter, practice = read(path), committed_practice(path)
    found = blanks(practice)
    assert found, f"practice/{path.name} has no blank"
    first = found[0]
    run_cell(kernel, nbformat.v4.new_code_cell("%reset -f\nimport matplotlib.pyplot\nmatplotlib.pyplot.close('all')"))
    stopped = None
    for i, cell in enumerate(practice.cells):
        if cell.cell_type != "code":
            continue
        try:
            run_cell(kernel, cell)
        except CellExecutionError as err:
            stopped = i
            assert i >= first and err.ename == "NotImplementedError", \
                f"practice/{path.name} cell {i} failed (its first blank is cell {first}): {err.ename}: {err.evalue}"
            break
    assert stopped is not None, f"practice/{path.name} ran to its end: its blank (cell {first}) raised nothing"
    for j in range(first, stopped + 1):
        if chapter.cells[j].cell_type == "code":
            solved = nbformat.from_dict(chapter.cells[j])
            solved.outputs, solved.execution_count = [], None
            run_cell(kernel, solved)            # raises CellExecutionError if the solution needs more


def run_cell(client, cell) -> None:
    """Execute one cell in the client's kernel (nbclient stores the outputs in client.nb)."""
    client.nb = nbformat.v4.new_notebook(cells=[cell])
    client.execute_cell(cell, 0)


# --- the tool on a small notebook -------------------------------------------------------------------


def _toy() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"},
                                            "language_info": {"name": "python", "version": "3.11.7"}})
    solved = nbformat.v4.new_code_cell(
        "def f(x):\n    \"\"\"Twice x.\"\"\"\n    ### BEGIN SOLUTION\n    y = x + x    # the answer\n"
        "    return y\n    ### END SOLUTION\n\nprint(f(2))", execution_count=3,
        outputs=[nbformat.v4.new_output("stream", text="4\n")], metadata={"tags": ["solution"], "scrolled": True})
    nb.cells = [nbformat.v4.new_markdown_cell("# Toy\nWrite `f`."), solved,
                nbformat.v4.new_code_cell("assert f(3) == 6", execution_count=4)]
    return nb


def test_tool_blanks_the_region_and_clears_every_output():
    chapter = _toy()
    practice = make_practice.make_practice(chapter)
    cell = practice.cells[1]
    assert cell.source == "def f(x):\n    \"\"\"Twice x.\"\"\"\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\nprint(f(2))"
    assert STUB == ("# YOUR CODE HERE", "raise NotImplementedError()")   # ClearSolutions' default stub
    assert all(c.get("outputs", []) == [] and c.get("execution_count") is None for c in practice.cells)
    assert cell.metadata == {"tags": ["solution"]}
    assert "language_info" not in practice.metadata and practice.metadata.kernelspec.name == "python3"
    assert blanks(practice) == [1]
    back = put_back(practice, solution_regions(chapter))
    assert [c.source for c in back.cells] == [c.source for c in chapter.cells]
    with pytest.raises(NotImplementedError):
        exec(practice.cells[1].source, {})


def test_tool_refuses_markers_it_would_misread():
    nb = _toy()
    nb.cells[0].source = "Put your code between ### BEGIN SOLUTION and the end."
    nb.cells[2].source = "### BEGIN SOLUTION\nx = 1\n### BEGIN SOLUTION\n### END SOLUTION\ny = 1  ### END SOLUTION"
    problems = make_practice.marker_problems(nb)
    assert any("cell 0 (markdown)" in p for p in problems), problems
    assert any("nested" in p for p in problems), problems
    assert any("is not exactly" in p for p in problems), problems
    with pytest.raises(ValueError, match="markdown"):
        make_practice.make_practice(nb)


def test_put_back_notices_a_practice_notebook_edited_by_hand():
    chapter = _toy()
    practice = make_practice.make_practice(chapter)
    practice.cells[1].source = practice.cells[1].source.replace("raise NotImplementedError()", "return 2 * x")
    with pytest.raises(ValueError, match="no blank"):
        put_back(practice, solution_regions(chapter))


def test_check_mode_reports_a_stale_practice_notebook(tmp_path, monkeypatch, capsys):
    chapter = tmp_path / "notebooks" / "01_toy.ipynb"
    chapter.parent.mkdir()
    nbformat.write(_toy(), chapter)
    monkeypatch.setattr(make_practice, "PRACTICE", tmp_path / "practice")
    assert make_practice.main(["--check", str(chapter)]) == 1
    assert make_practice.main([str(chapter)]) == 0
    assert make_practice.main(["--check", str(chapter)]) == 0
    nb = read(chapter)
    nb.cells[0].source += " Changed."
    nbformat.write(nb, chapter)
    assert make_practice.main(["--check", str(chapter)]) == 1
    assert "stale or missing" in capsys.readouterr().err


# --- the order tests/conftest.py gives the executions ------------------------------------------------


def test_practice_tests_follow_the_execution_whose_runs_they_read():
    from conftest import _chains, chapter_of
    chains = _chains()
    assert chains["05_sampling"] == chains["06_fast_sampling"] == "04_training"     # they load its checkpoint
    assert chains["07_skip_connection_ablation"] == "07_skip_connection_ablation"  # its own ablation runs
    assert chapter_of("notebooks/06_fast_sampling.ipynb::06_fast_sampling.ipynb") == ("06_fast_sampling", 0)
    assert chapter_of("tests/test_practice.py::test_practice_notebook_stops_at_its_first_blank[06_fast_sampling]") \
        == ("06_fast_sampling", 1)
    assert chapter_of("tests/test_cli.py::test_train_writes_a_checkpoint") is None


def test_collection_puts_each_chain_in_order(request):
    """In this run's collection, every chapter's execution comes before the practice tests that read its
    runs/ (chapter 4's before chapters 5 and 6, and theirs before their practice notebooks)."""
    from conftest import _chains, chapter_of
    chains = _chains()
    position = {}
    for i, item in enumerate(request.session.items):
        found = chapter_of(item.nodeid)
        if found:
            position[found] = i
    for (stem, kind), i in position.items():
        if kind == 1 and (chains[stem], 0) in position:
            assert position[chains[stem], 0] < i, f"practice {stem} runs before the execution of {chains[stem]}"
        if kind == 1 and (stem, 0) in position:
            assert position[stem, 0] < i, f"practice {stem} runs before its chapter's execution"
