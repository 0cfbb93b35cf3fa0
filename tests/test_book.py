"""The Jupyter Book builds with no warnings, and every chapter page shows its committed outputs,
its figures and its launch button."""
from __future__ import annotations

import html
import json
import re

import pytest

from test_notebooks_meta import CHAPTERS, ROOT, repo_url

pytestmark = pytest.mark.book


def page_text(path) -> str:
    """The visible text of an HTML page: tags dropped, entities decoded, whitespace collapsed."""
    raw = re.sub(r"<(script|style)\b.*?</\1>", " ", path.read_text(), flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", raw)))


def committed_text_lines(name: str, limit: int = 3) -> list:
    """A few distinctive lines the chapter's code cells printed (stream outputs), as committed."""
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    lines = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                for line in "".join(out["text"]).splitlines():
                    line = re.sub(r"\s+", " ", line).strip()
                    if len(line) >= 25 and "%|" not in line and line not in lines:
                        lines.append(line)
    return lines[:limit]


def test_book_builds_without_warnings(built_book, book_build):
    _, output, _ = book_build
    warnings = [line for line in output.splitlines() if re.search(r"\bWARNING\b|\bERROR\b", line)]
    assert not warnings, "\n".join(warnings)
    # the root page is book/intro (_toc.yml); index.html redirects there
    assert (built_book / "book" / "intro.html").is_file()
    assert 'url=book/intro.html' in (built_book / "index.html").read_text()


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_page_has_figures_and_colab_button(built_book, name):
    page = (built_book / "notebooks" / f"{name}.html").read_text()
    colab = f"colab.research.google.com/github/{repo_url().split('github.com/')[1]}/blob/main/notebooks/{name}.ipynb"
    assert colab in page, f"{name}: no Colab launch button for {colab}"
    # Notebook figures are extracted by the build into _images/: a page without any shows no result.
    images = re.findall(r'src="\.\./_images/([^"]+)"', page)
    assert images, f"{name} shows no figure from its committed outputs"
    missing = [img for img in images if not (built_book / "_images" / img).is_file()]
    assert not missing, f"{name} links figures the build did not write: {missing}"


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_page_shows_the_committed_outputs(built_book, name):
    """What the chapter printed in its committed run is on the page (execute_notebooks: off)."""
    expected = committed_text_lines(name)
    assert expected, f"{name}.ipynb has no printed output to look for"
    text = page_text(built_book / "notebooks" / f"{name}.html")
    missing = [line for line in expected if line not in text]
    assert not missing, f"{name}: committed outputs missing from the page: {missing}"
