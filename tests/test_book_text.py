"""The reader's text: every page and chapter in the table of contents speaks of the book, not of
the project's bookkeeping (issue numbers, editions, sessions, targets, commit hashes), and the
verdicts on *Training faster, measured* follow the rule that page states."""
from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# The words of the project's bookkeeping that a reader page must not use. "session" alone is
# allowed (a Colab or notebook session is the reader's); "this session" and friends are not.
INTERNAL = re.compile(
    r"(?i)\bissues?\s*#?\d+"                        # issue 13, issues 14
    r"|\b(first|second|third|fourth|this|that|previous|next|earlier|later) editions?\b|\beditions?\b"
    r"|\b(this|these|those|other|earlier|later|previous) sessions?\b|\bsessions that\b|\bsessions' runs\b"
    r"|\b8 ?x (goal|target)\b|\bthe 8 ?x\b"
    r"|\bgoal set for\b|\bthe goal'?s issue\b"
    r"|\bcommits?\s+[0-9a-f]{7,40}\b"
    r"|\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b")   # a bare hash: hex letters and digits


def toc_files() -> list:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    names = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    paths = []
    for name in names:
        for suffix in (".md", ".ipynb"):
            if (ROOT / (name + suffix)).exists():
                paths.append(ROOT / (name + suffix))
    return paths


def reader_text(path: Path):
    """(where, text) pieces a reader sees: a page's markdown (its includes too), a chapter's
    markdown cells and the text of its outputs (not its code, not image data)."""
    if path.suffix == ".md":
        text = path.read_text()
        yield path.name, text
        for inc in re.findall(r"```\{include\}\s+(\S+)", text):
            target = (path.parent / inc)
            if target.is_file():
                yield f"{path.name} -> {inc}", target.read_text()
        return
    cells = json.loads(path.read_text())["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "markdown":
            yield f"{path.name} cell {i}", "".join(cell["source"])
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            text = "".join(out.get("text", "")) + "".join(data.get("text/plain", "")) + \
                "".join(data.get("text/markdown", ""))
            if text:
                yield f"{path.name} cell {i} output", text


def test_the_toc_lists_reader_files():
    files = {p.name for p in toc_files()}
    assert "intro.md" in files and "results.md" in files and "04_training.ipynb" in files


@pytest.mark.parametrize("path", toc_files(), ids=lambda p: p.name)
def test_no_internal_words_in_reader_pages(path):
    found = []
    for where, text in reader_text(path):
        for m in INTERNAL.finditer(text):
            found.append(f"{where}: ...{text[max(0, m.start() - 40):m.end() + 20]!r}...")
    assert not found, "internal words a reader should not meet:\n" + "\n".join(found)


def test_the_pattern_catches_what_it_should():
    for bad in ("issue 14", "Issue #16", "the second edition", "this session", "the 8x goal", "commit 9913963",
                "at 3fab596 and", "the goal set for this chapter"):
        assert INTERNAL.search(bad), bad
    for fine in ("the other notebook's session", "Eq. 14", "2048x2048", "a 1,807,923-byte file", "8x more",
                 "DDIM-100", "0.0418"):
        assert not INTERNAL.search(fine), fine


# --- verdicts on Training faster, measured ---------------------------------------------------

VERDICT = re.compile(r"([+−-]\d+\.\d) ± (\d+\.\d): "
                     r"(within the spread|\*\*(?:better|worse)\*\*|(?:better|worse), exploratory|[^|(]*)")


def _verdicts(text: str) -> list:
    """(difference, spread, label) of every verdict cell in the page's tables."""
    out = []
    for line in text.splitlines():
        if line.startswith("|"):
            for diff, spread, label in VERDICT.findall(line):
                out.append((float(diff.replace("−", "-")), float(spread), label.strip(" *").lower()))
    return out


def test_training_faster_verdicts_follow_the_page_rule():
    text = (ROOT / "book" / "training_faster.md").read_text()
    verdicts = _verdicts(text)
    m = re.search(r"compares (\d+) scores", text)
    assert m, "the page must say how many comparisons it makes"
    n = int(m.group(1))
    assert len(verdicts) == n, f"the page says {n} comparisons, its tables hold {len(verdicts)}"
    z = statistics.NormalDist().inv_cdf(1 - 0.025 / n)
    assert f"**{z:.2f}** spreads" in text, f"the page must state the Bonferroni threshold {z:.2f}"
    for diff, spread, label in verdicts:
        ratio = abs(diff) / spread
        direction = "better" if diff < 0 else "worse"
        if ratio <= 2:
            assert label.startswith("within the spread"), (diff, spread, label)
        elif ratio <= z:
            assert label == f"{direction}, exploratory", (diff, spread, label)
        else:
            assert label == direction, (diff, spread, label)


def test_verdict_parser():
    rows = ["| a | −1.5 ± 12.4: within the spread |", "| b | +509.6 ± 18.4: **worse** (27.7 spreads) |",
            "| c | −10.3 ± 12.2: within the spread (against v alone: −34.0 ± 12.7: better, exploratory, 2.7 spreads) |"]
    assert _verdicts("\n".join(rows)) == [(-1.5, 12.4, "within the spread"), (509.6, 18.4, "worse"),
                                          (-10.3, 12.2, "within the spread"), (-34.0, 12.7, "better, exploratory")]
