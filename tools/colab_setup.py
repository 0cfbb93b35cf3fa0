"""The Colab set-up cell and the two Colab links: one shared text for every chapter.

Both are generated from ``repository.url`` and ``repository.branch`` in ``_config.yml``
(the one place the repository is named), so a move of the repository is one edit there
followed by one command here:

    python tools/colab_setup.py                              # print the set-up cell
    python tools/colab_setup.py --write notebooks/*.ipynb    # stamp the cell and the links
    python tools/colab_setup.py --check notebooks/*.ipynb    # exit 1 if a chapter differs

``--write`` replaces each chapter's set-up cell (the first code cell, recognised by its first
line ``# Colab set-up``; inserted before the first code cell when there is none) and puts the
two Colab links on the first line of the first markdown cell, replacing older ones: "Open in
Colab" (the complete chapter, notebooks/<name>.ipynb) and "Practise in Colab" (the same chapter
with its solutions blanked, practice/<name>.ipynb, written by tools/make_practice.py). The set-up
cell keeps its outputs and execution count: they are refreshed when the chapter is
re-executed, and clearing them would make a committed chapter look unexecuted.
"""
from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SETUP_MARK = "# Colab set-up"
BADGE_ALT = "Open the complete chapter in Colab"
PRACTICE_ALT = "Practise in Colab"
COLAB = "https://colab.research.google.com"
PRACTICE_DIR = "practice"        # where tools/make_practice.py writes each chapter's practice notebook


def _badge_svg(left: str, right: str) -> str:
    """A two-part badge, grey then Colab's orange, sized for its texts (11 px Verdana: about
    6.5 px a character)."""
    wl, wr = round(6.5 * len(left)) + 12, round(6.5 * len(right)) + 12
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{wl + wr}" height="20" role="img" '
            f'aria-label="{left}: {right}"><rect width="{wl + wr}" height="20" rx="3" fill="#555"/>'
            f'<rect x="{wl}" width="{wr}" height="20" rx="3" fill="#f9ab00"/>'
            f'<rect x="{wl}" width="6" height="20" fill="#f9ab00"/>'
            '<g font-family="Verdana,DejaVu Sans,sans-serif" font-size="11" text-anchor="middle">'
            f'<text x="{wl / 2}" y="14" fill="#fff">{left}</text>'
            f'<text x="{wl + wr / 2}" y="14" fill="#222">{right}</text></g></svg>')


def _data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode("ascii")


# The badge images travel inside the notebook as data: URIs: the rendered book makes no
# request to another site (tests/test_browser.py aborts any), and no CDN can vanish.
BADGE_IMAGE = _data_uri(_badge_svg("Open in Colab", "complete chapter"))
PRACTICE_BADGE_IMAGE = _data_uri(_badge_svg("Practise in Colab", "write the code yourself"))

# The cell a reader sees at the top of every chapter. REPO_SPEC is replaced by
# git+<repository.url>@<branch>. It must stay valid IPython everywhere: outside Colab it
# installs nothing, prints the runtime and the preset, and says what to do if the package
# is missing.
_SETUP_TEMPLATE = '''\
# Colab set-up. On Colab: install this book's package, ddpm_tutorial, from GitHub (pip prints
# only problems; Colab's own torch stays). Elsewhere: install nothing (see the README).
# Another source (a fork, an uploaded zip): %env DDPM_REPO_URL=<what pip should install>
import importlib
import os
import sys

import torch

REPO_URL = os.environ.get("DDPM_REPO_URL", "REPO_SPEC")
ON_COLAB = "google.colab" in sys.modules
if ON_COLAB:
    %pip install -q {REPO_URL}
    importlib.invalidate_caches()
if torch.cuda.is_available():
    print("Runtime: GPU", torch.cuda.get_device_name(0))
else:
    print("Runtime: CPU. For a GPU on Colab: Runtime → Change runtime type → T4 GPU, then run all again.")
try:
    from ddpm_tutorial.config import preset_name
except ImportError as err:
    todo = (f"Installing it from {REPO_URL} failed (pip's output above says why). Upload the repository "
            "as a zip (Files panel) and run  %pip install /content/<the zip>,  or set  %env DDPM_REPO_URL=...  "
            "and run this cell again." if ON_COLAB else "Install it first: pip install -e . in a clone (README).")
    raise ImportError(f"ddpm_tutorial cannot be imported ({err}). {todo}") from None
print("Preset:", preset_name())'''


def repository(config: Path = ROOT / "_config.yml") -> tuple[str, str]:
    """(url, branch) of ``repository:`` in the Jupyter Book config."""
    repo = yaml.safe_load(Path(config).read_text())["repository"]
    return repo["url"].rstrip("/"), repo.get("branch") or "main"


def repo_spec(config: Path = ROOT / "_config.yml") -> str:
    """What the set-up cell gives pip: ``git+<repository.url>@<branch>``."""
    url, branch = repository(config)
    return f"git+{url}@{branch}"


def setup_cell_source(config: Path = ROOT / "_config.yml") -> str:
    """The text of the set-up cell, identical in every chapter (no final newline, as Jupyter saves it)."""
    return _SETUP_TEMPLATE.replace("REPO_SPEC", repo_spec(config))


def colab_url(chapter: str, config: Path = ROOT / "_config.yml") -> str:
    """Colab's address of a notebook of the repository, e.g. ``notebooks/01_forward_process.ipynb``."""
    url, branch = repository(config)
    match = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)(\.git)?", url)
    if not match:
        raise ValueError(f"repository.url must be a GitHub repository for Colab to open it, got {url!r}")
    book = (yaml.safe_load(Path(config).read_text())["repository"].get("path_to_book") or "").strip("/")
    path = f"{book}/{chapter}" if book else chapter
    return f"{COLAB}/github/{match.group(1)}/blob/{branch}/{path}"


def practice_of(chapter: str) -> str:
    """The practice notebook of a chapter: ``notebooks/01_x.ipynb`` -> ``practice/01_x.ipynb``."""
    return f"{PRACTICE_DIR}/{Path(chapter).name}"


def badge_markdown(chapter: str, config: Path = ROOT / "_config.yml") -> str:
    """The two links, as the HTML Colab itself writes into notebooks it saves to GitHub: the
    complete chapter, then its practice notebook. (Markdown's ![..](..) would not do:
    markdown-it, under MyST, refuses SVG data: URIs as image links.)"""
    links = ((colab_url(chapter, config), BADGE_IMAGE, BADGE_ALT),
             (colab_url(practice_of(chapter), config), PRACTICE_BADGE_IMAGE, PRACTICE_ALT))
    return " ".join(f'<a href="{url}" target="_parent"><img src="{image}" alt="{alt}"/></a>'
                    for url, image, alt in links)


# A first line made only of Colab badges (this tool's, or the one badge it wrote before).
_BADGE_LINE = re.compile(r'\A(?:<a href="[^"]*"[^>]*><img [^>]*alt="[^"]*Colab[^"]*"/></a>[ \t]*)+\n*')


def chapter_of(path: Path) -> str:
    """The notebook's path inside the repository (``notebooks/<name>`` outside the checkout)."""
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return f"notebooks/{Path(path).name}"


def _source(cell) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def _lines(text: str) -> list:
    return text.splitlines(keepends=True)


def stamp(nb: dict, chapter: str, config: Path = ROOT / "_config.yml") -> dict:
    """Put the badge and the set-up cell into a notebook (a dict as in the .ipynb file), in place."""
    cells = nb["cells"]
    # 1. The two links: the first line of the first markdown cell.
    first_md = next((c for c in cells if c["cell_type"] == "markdown"), None)
    if first_md is None:
        raise ValueError(f"{chapter} has no markdown cell to carry the Colab links")
    text = _source(first_md)
    text = _BADGE_LINE.sub("", text)
    first_md["source"] = _lines(badge_markdown(chapter, config) + "\n\n" + text)
    # 2. The set-up cell: replace the first code cell if it is one, or insert it before it.
    setup = _lines(setup_cell_source(config))
    code = [i for i, c in enumerate(cells) if c["cell_type"] == "code"]
    if code and _source(cells[code[0]]).startswith(SETUP_MARK):
        cells[code[0]]["source"] = setup
    else:
        at = code[0] if code else len(cells)
        cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": setup}
        if nb.get("nbformat", 4) >= 4 and nb.get("nbformat_minor", 0) >= 5:
            cell["id"] = f"colab-setup-{at}"
        cells.insert(at, cell)
    return nb


def problems(nb: dict, chapter: str, config: Path = ROOT / "_config.yml") -> list:
    """What differs from the shared text in one notebook; empty when it is stamped."""
    found = []
    first_md = next((c for c in nb["cells"] if c["cell_type"] == "markdown"), None)
    badge = badge_markdown(chapter, config)
    if first_md is None or not _source(first_md).startswith(badge + "\n"):
        found.append(f"{chapter}: the first markdown cell does not start with the two Colab links {badge[:40]}...")
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    if not code or _source(code[0]) != setup_cell_source(config):
        found.append(f"{chapter}: the first code cell is not the shared Colab set-up cell")
    return found


def _read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _write(path: Path, nb: dict) -> None:
    # The layout Jupyter and nbformat write (and tools/finalize_notebooks.py keeps).
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="stamp the set-up cell and the two Colab links")
    mode.add_argument("--check", action="store_true", help="exit 1 if a notebook is not stamped")
    parser.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        print(setup_cell_source())
        return 0
    if not args.notebooks:
        parser.error("name the notebooks, e.g. notebooks/*.ipynb")
    failed = []
    for path in args.notebooks:
        nb, chapter = _read(path), chapter_of(path)
        if args.write:
            before = json.dumps(nb)
            stamp(nb, chapter)
            if json.dumps(nb) != before:
                _write(path, nb)
                print(f"{path}: stamped")
        else:
            failed += problems(nb, chapter)
    for line in failed:
        print(line, file=sys.stderr)
    if failed:
        print("run: python tools/colab_setup.py --write notebooks/*.ipynb", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
