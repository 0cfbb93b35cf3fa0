"""The practice notebooks: each chapter with its solutions blanked, generated, never edited by hand.

A chapter marks every piece the reader is to write, in a code cell, between two comment lines

    ### BEGIN SOLUTION
    ...the book's code...
    ### END SOLUTION

(nbgrader's markers). This tool runs the chapter through nbconvert with nbgrader's
``ClearSolutions`` preprocessor, which replaces each marked region by its code stub
(``# YOUR CODE HERE`` / ``raise NotImplementedError()``), then clears every output (a printed
answer or a figure is a solution too) and keeps only the metadata Colab and Jupyter need. The
results are committed under practice/, where the "Practise in Colab" link of each chapter
(tools/colab_setup.py) opens them:

    python tools/make_practice.py                      # (re)write practice/ from notebooks/*.ipynb
    python tools/make_practice.py --check              # exit 1 if practice/ is stale or incomplete
    python tools/make_practice.py notebooks/01_forward_process.ipynb   # just these chapters

tests/test_practice.py checks that practice/ is up to date, that each practice notebook stops at
its first blank, that putting the solutions back gives the chapter again, and that nothing leaks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "notebooks"
PRACTICE = ROOT / "practice"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
# ClearSolutions' default stub for Python, as nbgrader writes it (one line each, indented like the marker).
STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
KEEP_NOTEBOOK_METADATA = {"kernelspec", "colab", "accelerator"}   # Colab's GPU request and the kernel
KEEP_CELL_METADATA = {"tags"}                                      # hide-cell etc.: the book's own tags


def practice_path(chapter: Path) -> Path:
    """practice/<name>.ipynb for notebooks/<name>.ipynb."""
    return PRACTICE / Path(chapter).name


def _exporter():
    """nbconvert's notebook-to-notebook exporter with the three preprocessors, in order."""
    from nbconvert.exporters import NotebookExporter
    from nbconvert.preprocessors import ClearMetadataPreprocessor, ClearOutputPreprocessor
    from nbgrader.preprocessors import ClearSolutions
    from traitlets.config import Config

    config = Config()
    # The chapters carry no nbgrader cell metadata: they are not graded assignments.
    config.ClearSolutions.enforce_metadata = False
    config.ClearMetadataPreprocessor.preserve_nb_metadata_mask = set(KEEP_NOTEBOOK_METADATA)
    config.ClearMetadataPreprocessor.preserve_cell_metadata_mask = set(KEEP_CELL_METADATA)
    exporter = NotebookExporter(config=config)
    for preprocessor in (ClearSolutions, ClearOutputPreprocessor, ClearMetadataPreprocessor):
        exporter.register_preprocessor(preprocessor, enabled=True)
    return exporter


def marker_problems(nb) -> list:
    """What would make ClearSolutions misread a chapter: markers outside code cells (it would
    blank prose), unpaired or nested markers, or a marker that is not alone on its line."""
    problems = []
    for i, cell in enumerate(nb.cells):
        lines = cell.source.split("\n")
        marked = [(k, line.strip()) for k, line in enumerate(lines) if "BEGIN SOLUTION" in line or "END SOLUTION" in line]
        if not marked:
            continue
        if cell.cell_type != "code":
            problems.append(f"cell {i} ({cell.cell_type}) mentions a solution marker; only code cells may")
            continue
        depth = 0
        for k, line in marked:
            if line not in (BEGIN, END):
                problems.append(f"cell {i} line {k + 1}: {line!r} is not exactly {BEGIN!r} or {END!r}")
                continue
            depth += 1 if line == BEGIN else -1
            if depth not in (0, 1):
                problems.append(f"cell {i} line {k + 1}: {line} {'nested' if depth > 1 else 'without a BEGIN'}")
                depth = max(0, min(depth, 1))
        if depth:
            problems.append(f"cell {i}: {BEGIN} without {END}")
    return problems


def make_practice(chapter) -> nbformat.NotebookNode:
    """The practice notebook of a chapter (a path or a NotebookNode)."""
    nb = nbformat.read(chapter, as_version=4) if isinstance(chapter, (str, Path)) else chapter
    problems = marker_problems(nb)
    if problems:
        raise ValueError(f"{getattr(chapter, 'name', 'chapter')}: " + "; ".join(problems))
    body, _ = _exporter().from_notebook_node(nb)
    return nbformat.reads(body, as_version=4)


def practice_text(chapter) -> str:
    """What practice/<name>.ipynb must contain, byte for byte (nbformat's own layout)."""
    return nbformat.writes(make_practice(chapter)) + "\n"


def solution_regions(nb) -> list:
    """Every marked region of a chapter, in order: [(cell index, [lines from BEGIN to END])]."""
    regions = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        current = None
        for line in cell.source.split("\n"):
            if line.strip() == BEGIN:
                current = [line]
            elif current is not None:
                current.append(line)
                if line.strip() == END:
                    regions.append((i, current))
                    current = None
    return regions


def blanks(nb) -> list:
    """Indices of the code cells of a practice notebook that hold a stub, in order."""
    return [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and _stub_starts(cell.source)]


def _stub_starts(source: str) -> list:
    lines = source.split("\n")
    return [k for k in range(len(lines) - 1)
            if lines[k].strip() == STUB[0] and lines[k + 1].strip() == STUB[1]
            and lines[k][:len(lines[k]) - len(lines[k].lstrip())] == lines[k + 1][:len(lines[k + 1]) - len(lines[k + 1].lstrip())]]


def put_back(practice, regions) -> nbformat.NotebookNode:
    """The practice notebook with each stub replaced by the chapter's region (inverse of the tool):
    equal to the chapter's sources when ClearSolutions changed nothing but the marked regions."""
    nb = nbformat.from_dict(practice)
    queue = list(regions)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        lines, out, k = cell.source.split("\n"), [], 0
        starts = set(_stub_starts(cell.source))
        while k < len(lines):
            if k in starts:
                if not queue:
                    raise ValueError(f"cell {i}: more blanks than the chapter has solutions")
                where, region = queue.pop(0)
                if where != i:
                    raise ValueError(f"cell {i}: a blank where the chapter's next solution is in cell {where}")
                out += region
                k += 2
            else:
                out.append(lines[k])
                k += 1
        cell.source = "\n".join(out)
    if queue:
        raise ValueError(f"{len(queue)} solution(s) of the chapter have no blank (cells {[w for w, _ in queue]})")
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a practice notebook is stale or missing")
    parser.add_argument("chapters", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    args = parser.parse_args(argv)
    chapters = args.chapters or sorted(CHAPTERS.glob("*.ipynb"))
    stale = []
    for chapter in chapters:
        target, text = practice_path(chapter), practice_text(chapter)
        current = target.read_text() if target.is_file() else None
        if current == text:
            continue
        if args.check:
            stale.append(target)
            continue
        target.parent.mkdir(exist_ok=True)
        target.write_text(text)
        n = len(blanks(nbformat.reads(text, as_version=4)))
        print(f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}: written, {n} blank(s)")
    if not args.chapters:
        orphans = sorted(set(PRACTICE.glob("*.ipynb")) - {practice_path(c) for c in chapters})
        for orphan in orphans:        # a chapter renamed or removed: its practice notebook goes too
            if args.check:
                stale.append(orphan)
            else:
                orphan.unlink()
                print(f"{orphan.relative_to(ROOT)}: removed (no chapter of that name)")
    for path in stale:
        print(f"{path}: stale or missing", file=sys.stderr)
    if stale:
        print("run: python tools/make_practice.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
