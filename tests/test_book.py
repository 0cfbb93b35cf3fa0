"""The Jupyter Book builds with no warnings and every chapter page has its launch button."""
from __future__ import annotations

import re

import pytest

from test_notebooks_meta import CHAPTERS, repo_url

pytestmark = pytest.mark.book


def test_book_builds_without_warnings(built_book, book_build):
    _, output, _ = book_build
    warnings = [line for line in output.splitlines() if re.search(r"\bWARNING\b|\bERROR\b", line)]
    assert not warnings, "\n".join(warnings)
    assert (built_book / "index.html").exists() or (built_book / "book" / "intro.html").exists()


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_page_has_figures_and_colab_button(built_book, name):
    page = (built_book / "notebooks" / f"{name}.html").read_text()
    assert "colab.research.google.com" in page and repo_url().split("github.com/")[1] in page
    # Notebook figures are extracted by the build into _images/: a page without any shows no result.
    assert 'src="../_images/' in page, f"{name} shows no figure from its committed outputs"
    assert "ddpm_tutorial" in page
