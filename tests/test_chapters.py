"""The chapters as a reader gets them: exercises with checked solutions, no preset-name branches,
no local paths or frozen progress bars in the committed outputs, and every number in the prose
glued from the run that produced it. Plus tools/finalize_notebooks.py, which makes the bars final.

Each check names the notebook, the cell (index in the notebook, 0-based) and the offending text.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "tools"))
import finalize_notebooks  # noqa: E402

by_stem = pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def source(cell) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def chapter_number(path: Path) -> int:
    return int(re.match(r"(\d+)_", path.name).group(1))


def where(path: Path, index: int, cell=None) -> str:
    count = cell.get("execution_count") if cell else None
    return f"{path.name} cell {index}" + (f" [{count}]" if count else "")


# --- exercises ------------------------------------------------------------------------------

# A MyST directive whose title says "Exercise N.k": :::{admonition} Exercise 4.1: ... / ```{note} Exercise 4.1
EXERCISE = re.compile(r"^(?:`{3,}|:{3,}|~{3,})\{[\w:-]+\}[ \t]*[^\n]*?\bExercise\s+(\d+)\.(\d+)\b", re.M)
ASSERTS = re.compile(r"^[^#\n]*\bassert(?:\b|_)", re.M)      # assert ..., torch.testing.assert_close(...)


def exercises(nb: dict) -> list:
    """[(cell index, N, k)] for every markdown cell that opens an "Exercise N.k" admonition."""
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            found += [(i, int(n), int(k)) for n, k in EXERCISE.findall(source(cell))]
    return found


@by_stem
def test_at_least_two_numbered_exercises(path):
    found = exercises(load(path))
    n = chapter_number(path)
    assert len(found) >= 2, (f"{path.name}: {len(found)} exercise(s); each chapter needs at least 2 markdown cells "
                             f"opening an admonition titled 'Exercise {n}.k' (e.g. ':::{{admonition}} Exercise {n}.1')")
    wrong = [f"cell {i}: Exercise {N}.{k}" for i, N, k in found if N != n]
    assert not wrong, f"{path.name}: exercises must be numbered {n}.k in chapter {n}: {wrong}"
    ks = [k for _, _, k in found]
    assert ks == list(range(1, len(ks) + 1)), f"{path.name}: exercises numbered {ks}, expected 1..{len(ks)} in order"


def solution_problems(nb: dict, name: str = "notebook") -> list:
    """What is wrong with the solutions: each exercise's next code cell must be tagged
    "solution" and "hide-cell" (hidden in the book, run by the notebook tests) and assert something."""
    found = exercises(nb)
    starts = {i for i, _, _ in found}
    problems = []
    for i, N, k in found:
        nxt = next((j for j in range(i + 1, len(nb["cells"])) if nb["cells"][j]["cell_type"] == "code"), None)
        if nxt is None or any(i < j < nxt for j in starts):
            problems.append(f"Exercise {N}.{k} (cell {i}) is not followed by a code cell before the next exercise")
            continue
        cell = nb["cells"][nxt]
        tags = set(cell.get("metadata", {}).get("tags", []))
        missing = {"solution", "hide-cell"} - tags
        label = f"cell {nxt}" + (f" [{cell['execution_count']}]" if cell.get("execution_count") else "")
        if missing:
            problems.append(f"Exercise {N}.{k}: its solution ({name} {label}) lacks the tag(s) "
                            f"{sorted(missing)} (has {sorted(tags)})")
        if not ASSERTS.search(source(cell)):
            problems.append(f"Exercise {N}.{k}: its solution ({name} {label}) checks nothing: "
                            f"no assert / assert_close in {source(cell)[:80]!r}")
    return problems


@by_stem
def test_every_exercise_has_a_hidden_solution_that_asserts(path):
    problems = solution_problems(load(path), path.name)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def _md(text):
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def _code(text, tags=()):
    return {"cell_type": "code", "metadata": {"tags": list(tags)}, "source": text, "outputs": [],
            "execution_count": None}


def test_exercise_checks_on_a_synthetic_notebook():
    good = ("solution", "hide-cell")
    nb = {"cells": [
        _md("# Title"),
        _md(":::{admonition} Exercise 4.1: do it\n:class: tip\nWork.\n:::"), _code("x = 1\nassert x == 1", good),
        _md("```{note} Exercise 4.2\nMore.\n```"), _code("# assert nothing\nprint(1)", good),
        _md(":::{admonition} Exercise 4.3\n:::"), _code("torch.testing.assert_close(a, b)", ("solution",)),
        _md(":::{admonition} Exercise 4.4\n:::"), _md(":::{admonition} Exercise 4.5\n:::"), _code("assert 1", good),
        _md("An exercise 4.6 mentioned in passing is not an exercise."),
    ]}
    assert [(N, k) for _, N, k in exercises(nb)] == [(4, 1), (4, 2), (4, 3), (4, 4), (4, 5)]
    problems = solution_problems(nb, "nb")
    assert len(problems) == 3, problems
    assert "Exercise 4.2: its solution (nb cell 4) checks nothing" in problems[0]
    assert "Exercise 4.3: its solution (nb cell 6) lacks the tag(s) ['hide-cell']" in problems[1]
    assert "Exercise 4.4 (cell 7) is not followed by a code cell before the next exercise" in problems[2]


# --- one source for settings ------------------------------------------------------------------------

PRESET_BRANCH = re.compile(r"\bpreset\.name\s*(?:==|!=)|(?:==|!=)\s*preset\.name\b|\bpreset\.name\s+(?:not\s+)?in\b")


@by_stem
def test_no_branches_on_the_preset_name(path):
    """A chapter reads its knobs from the preset (config.PRESETS), never `if preset.name == "quick"`."""
    nb = load(path)
    hits = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            for line in source(cell).splitlines():
                if PRESET_BRANCH.search(line.split("#")[0]):
                    hits.append(f"{where(path, i, cell)}: {line.strip()}")
    assert not hits, "compare no preset names; put the value in the preset instead:\n" + "\n".join(hits)


# --- committed outputs ------------------------------------------------------------------------------

TEXT_MIMES = ("text/plain", "text/html", "text/markdown", "text/latex", "application/json")


def output_texts(cell) -> list:
    """The text of every output of a code cell (no images: base64 may contain anything)."""
    texts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            texts.append(source({"source": out.get("text", "")}))
        elif out.get("output_type") == "error":
            texts.append("\n".join([out.get("ename", ""), out.get("evalue", ""), *out.get("traceback", [])]))
        else:
            for mime in TEXT_MIMES:
                if mime in out.get("data", {}):
                    value = out["data"][mime]
                    texts.append(value if isinstance(value, str) else
                                 "".join(value) if isinstance(value, list) else json.dumps(value))
    return texts


LOCAL_PATH = re.compile(r"/root/|/home/|/work/|site-packages")


@by_stem
def test_no_local_paths_in_outputs(path):
    """Outputs are read by everyone: no /root/, /home/, /work/ or site-packages (print relative
    paths, and fix warnings rather than committing them)."""
    nb = load(path)
    hits = []
    for i, cell in enumerate(nb["cells"]):
        for text in output_texts(cell):
            for m in LOCAL_PATH.finditer(text):
                hits.append(f"{where(path, i, cell)}: ...{text[max(0, m.start() - 60):m.end() + 40]!r}...")
    assert not hits, f"{len(hits)} local path(s) in committed outputs:\n" + "\n".join(hits[:10])


BAR = re.compile(r"(\d{1,3})%\|")


def final_lines(text: str) -> list:
    """What a terminal shows of a text: each line as its last carriage-return segment."""
    return [line.split("\r")[-1] for line in text.split("\n")]


def stuck_bars(nb: dict, name: str = "notebook") -> list:
    stuck = []
    for i, cell in enumerate(nb["cells"]):
        for text in output_texts(cell):
            for line in final_lines(text):
                if any(int(v) < 100 for v in BAR.findall(line)):
                    stuck.append(f"{name} cell {i}: {line.strip()[:120]!r}")
    return stuck


@by_stem
def test_no_progress_bar_stuck_below_100_percent(path):
    """A bar below 100% in a committed output is a frozen widget fallback (run
    tools/finalize_notebooks.py after `jupyter execute`) or a loop that did not finish."""
    stuck = stuck_bars(load(path), path.name)
    assert not stuck, "progress bars below 100% in committed outputs:\n" + "\n".join(stuck)


def test_stuck_bar_check_reads_the_final_state():
    def cell(*outputs):
        return {"cell_type": "code", "outputs": list(outputs)}
    stream = {"output_type": "stream", "name": "stderr",
              "text": "training:   0%|     | 0/10\rtraining:  50%|##   | 5/10\rtraining: 100%|#####| 10/10\n"}
    frozen = {"output_type": "display_data", "data": {"text/plain": ["DDPM sampling:   0%|", "   | 0/1000"]}}
    ok = {"output_type": "display_data", "data": {"text/plain": "sampling: 100%|██████████| 5/5 [00:01<00:00]"}}
    prose = {"output_type": "stream", "name": "stdout", "text": "kept 40% of the signal| and 7%|"}
    assert stuck_bars({"cells": [cell(stream, ok)]}) == []
    assert stuck_bars({"cells": [cell(ok), cell(frozen)]}, "nb") == ["nb cell 1: 'DDPM sampling:   0%|   | 0/1000'"]
    assert len(stuck_bars({"cells": [cell(prose)]})) == 1     # "7%|" reads as a bar: kept strict


# --- numbers in prose are glued --------------------------------------------------------------------

# Words after which a number names something (a chapter, an equation, a version) rather than a result.
REFERENCE_WORDS = (r"(?i:\b(?:Eqs?\.|Equations?|Sections?|Sec\.|Chapters?|Ch\.|Exercises?|Algorithms?|Figures?|"
                   r"Fig\.|Tables?|Appendix|versions?|v|Python|Jupyter Book|ipywidgets|torch|CUDA)|§)")
DECIMAL = re.compile(r"(?<![\w.])[-+−]?\d+\.\d+(?![\w]|\.\d)")
PERCENT = re.compile(r"(?<![\w.])\d+(?:\.\d+)?\s?%")


def prose(markdown: str) -> str:
    """The markdown a reader reads as sentences: without math, code, roles, directive options,
    HTML tags, link targets, heading numbers, and numbers that name a chapter, an equation or a version."""
    lines, out, fence = markdown.split("\n"), [], None
    for line in lines:
        stripped = line.strip()
        opener = re.match(r"^(`{3,}|~{3,}|:{3,})(.*)$", stripped)
        if fence is not None:
            if stripped.startswith(fence[0]) and stripped.strip(fence[0][0]) == "":
                fence = None
            elif fence[1]:                                 # inside a code or math block: drop
                pass
            elif not re.match(r"^:[\w-]+:", stripped):     # directive body: keep (options dropped)
                out.append(line)
            continue
        if opener:
            marker, rest = opener.groups()
            directive = re.match(r"^\{([\w:-]+)\}\s*(.*)$", rest.strip())
            drop = directive is None or directive.group(1) in ("code", "code-block", "code-cell", "math",
                                                               "glue:figure", "glue:math", "raw")
            fence = (marker, drop)
            if directive and not drop:
                out.append(directive.group(2))             # the title, e.g. "Exercise 4.1: ..."
            continue
        out.append(re.sub(r"^(#{1,6})\s*(?:Chapter\s+)?\d+(?:\.\d+)*\.?\s", r"\1 ", line))
    text = "\n".join(out)
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.S)                    # display math
    text = re.sub(r"\\begin\{(\w+\*?)\}.*?\\end\{\1\}", " ", text, flags=re.S)
    text = re.sub(r"(?<!\\)\$[^$\n]+?(?<!\\)\$", " ", text)                 # inline math
    text = re.sub(r"\{[\w:-]+\}`[^`]*`", " ", text)                         # roles: {glue:text}`x`, {cite}`y`
    text = re.sub(r"``.*?``|`[^`\n]*`", " ", text)                          # inline code
    text = re.sub(r"<[^>\n]*>", " ", text)                                  # HTML tags and attributes
    text = re.sub(r"\]\([^)\s]*\)", "] ", text)                             # link targets
    text = re.sub(r"https?://\S+", " ", text)
    text = re.sub(REFERENCE_WORDS + r"\s*\(?\d+(?:[.\-–]\d+)*\)?", " ", text)
    return re.sub(r"\(\d+\)", " ", text)                                   # (11): an equation number


def typed_numbers(markdown: str) -> list:
    text = prose(markdown)
    return [m.group(0) for m in DECIMAL.finditer(text)] + [m.group(0) for m in PERCENT.finditer(text)]


@pytest.mark.parametrize("markdown, expected", [
    ("The loss falls to 0.074 after training.", ["0.074"]),
    ("DDIM-50 scores 101.9 and clipping costs 12%.", ["101.9", "12%"]),
    ("It reaches {glue:text}`fd_ddim50:.1f`, see Eq. (11) and Eqs. 6-7.", []),
    ("With $\\beta_T = 0.02$ and `lr=2e-4` or ``0.5``:", []),
    ("$$\n\\bar\\alpha_{500} = 0.0786\n$$\n", []),
    ("# 4.2 Training\n## Chapter 3. U-Net", []),
    (":::{admonition} Exercise 4.1: halve 0.5\n:class: tip\nDo it.\n:::", ["0.5"]),
    (":::{admonition} Exercise 4.2\n:width: 80%\n:::", []),
    ("```python\nx = 0.25\n```\nThen 25 % of it.", ["25 %"]),
    ("Read [the post](https://x.org/v1.2/a) and {cite:p}`ho2020`, Section 5.3, ipywidgets 7.7.", []),
])
def test_typed_number_heuristic(markdown, expected):
    assert typed_numbers(markdown) == expected


@by_stem
def test_numbers_in_prose_are_glued(path):
    """Markdown states no decimal result or percentage by hand: a typed number goes stale when the
    chapter is re-run. Glue it (myst-nb ``glue`` in code, {glue:text}`name` in the prose), or put a
    constant in $math$ / `code`."""
    nb = load(path)
    hits = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            lines = source(cell).splitlines()
            for number in typed_numbers(source(cell)):
                # the line where the number stands in prose (not in its math or code)
                line = next((ln for ln in lines if number in prose(ln)), None) or \
                    next((ln for ln in lines if number in ln), "")
                hits.append(f"{path.name} cell {i}: {number!r} in {line.strip()[:110]!r}")
    assert not hits, f"{len(hits)} typed number(s) in the prose:\n" + "\n".join(hits)


GLUE_ROLE = re.compile(r"\{glue(?::\w*)?\}`([^`:]+)")
GLUE_DIRECTIVE = re.compile(r"^[`:]{3,}\{glue(?::\w*)?\}\s+(\S+)", re.M)
GLUE_CALL = re.compile(r"\bglue\(\s*(?:name\s*=\s*)?(f?)([\"'])(.+?)\2")
GLUE_BY_VARIABLE = re.compile(r"\bglue\(\s*[A-Za-z_]\w*\s*,")
NAMED_VALUE = re.compile(r"[\"'](\w+)[\"']\s*:|\b(\w+)\s*=(?!=)")


def glued_names(nb: dict) -> tuple:
    """(literal names, f-string name patterns) glued by code cells, plus names found in the
    committed outputs' glue records (myst-nb writes metadata.scrapbook.name). A cell that glues
    a variable (``for key, value in dict(a=1, b=2).items(): glue(key, value)``) counts its
    keyword and string keys as glued."""
    literal, patterns = set(), []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        if GLUE_BY_VARIABLE.search(source(cell)):
            literal.update(a or b for a, b in NAMED_VALUE.findall(source(cell)))
        for is_f, _, name in GLUE_CALL.findall(source(cell)):
            if is_f and "{" in name:
                patterns.append(re.compile("^" + re.sub(r"\\\{[^}]*\\\}", ".+", re.escape(name)) + "$"))
            else:
                literal.add(name)
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                literal.add(name)
    return literal, patterns


@by_stem
def test_every_glue_reference_is_glued_in_the_same_notebook(path):
    nb = load(path)
    literal, patterns = glued_names(nb)
    missing = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            text = source(cell)
            for name in dict.fromkeys(n.strip() for n in GLUE_ROLE.findall(text) + GLUE_DIRECTIVE.findall(text)):
                if name not in literal and not any(p.match(name) for p in patterns):
                    missing.append(f"{path.name} cell {i}: {{glue}} `{name}` is never glued (no glue(\"{name}\", ...))")
    assert not missing, "\n".join(missing)


# --- tools/finalize_notebooks.py --------------------------------------------------------------------

STATE = finalize_notebooks.WIDGET_STATE
VIEW = finalize_notebooks.WIDGET_VIEW


def _bar_models(box, desc, value, total, meter, hidden=False):
    """The widget models tqdm.notebook creates for one bar (as nbclient stores them)."""
    ids = [f"{box}-{part}" for part in ("left", "bar", "right", "layout")]
    return {
        box: {"model_name": "HBoxModel", "state": {"children": [f"IPY_MODEL_{i}" for i in ids[:3]],
                                                    "layout": f"IPY_MODEL_{ids[3]}"}},
        ids[0]: {"model_name": "HTMLModel", "state": {"value": desc}},
        ids[1]: {"model_name": "FloatProgressModel", "state": {"value": value, "max": total, "bar_style": "success"}},
        ids[2]: {"model_name": "HTMLModel", "state": {"value": meter}},
        ids[3]: {"model_name": "LayoutModel", "state": {"visibility": "hidden" if hidden else None}},
    }


def _view(model_id, initial):
    return {"output_type": "display_data", "metadata": {},
            "data": {VIEW: {"model_id": model_id, "version_major": 2, "version_minor": 0}, "text/plain": initial}}


def synthetic_notebook():
    state = {}
    state.update(_bar_models("done", "training:\u2007100%", 3800.0, 3800.0,
                             "\u20073800/3800\u2007[08:00&lt;00:00,\u20077.90it/s,\u2007loss=0.041]"))
    state.update(_bar_models("part", "sampling:\u200745%", 45.0, 100.0, "\u200745/100\u2007[00:01&lt;00:01]"))
    state.update(_bar_models("gone", "inner:\u2007100%", 5.0, 5.0, "\u20075/5", hidden=True))
    state["slider"] = {"model_name": "IntSliderModel", "state": {"value": 3}}
    cells = [
        {"cell_type": "code", "execution_count": 1, "metadata": {}, "source": "train()", "outputs": [
            _view("done", "training:   0%|          | 0/3800 [00:00<?, ?it/s]"),
            {"output_type": "stream", "name": "stdout", "text": "done\n"}]},
        {"cell_type": "code", "execution_count": 2, "metadata": {}, "source": "sample()", "outputs": [
            _view("part", "sampling:   0%|          | 0/100 [00:00<?, ?it/s]"),
            _view("gone", "inner:   0%|          | 0/5 [00:00<?, ?it/s]")]},
        {"cell_type": "code", "execution_count": 3, "metadata": {}, "source": "slider", "outputs": [
            _view("slider", "IntSlider(value=3)")]},
        {"cell_type": "markdown", "metadata": {}, "source": "text"},
    ]
    return {"cells": cells, "metadata": {"widgets": {STATE: {"state": state, "version_major": 2,
                                                                 "version_minor": 0}}},
            "nbformat": 4, "nbformat_minor": 5}


def test_finalize_writes_each_bars_final_state(tmp_path):
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(synthetic_notebook()))
    counts = finalize_notebooks.finalize(path)
    nb = load(path)
    assert counts == {"bars": 2, "hidden": 1, "other_widgets": 1, "state": 1}
    assert "widgets" not in nb["metadata"] and VIEW not in json.dumps(nb)
    first, second, third = (c["outputs"] for c in nb["cells"][:3])
    assert first[0]["data"] == {"text/plain": "training: 100%|██████████| 3800/3800 [08:00<00:00, 7.90it/s, loss=0.041]"}
    assert first[1] == {"output_type": "stream", "name": "stdout", "text": "done\n"}
    assert second == [{"output_type": "display_data", "metadata": {},
                       "data": {"text/plain": "sampling: 45%|████▌     | 45/100 [00:01<00:01]"}}]   # hidden bar gone
    assert third[0]["data"] == {"text/plain": "IntSlider(value=3)"}           # other widgets: their fallback
    # finalized twice: nothing more to do, nothing changes
    before = path.read_text()
    assert finalize_notebooks.finalize(path) == {"bars": 0, "hidden": 0, "other_widgets": 0, "state": 0}
    assert path.read_text() == before


def test_finalize_bar_drawing_matches_tqdm():
    from tqdm.std import Bar
    for fraction in (0.0, 0.05, 0.45, 0.5, 0.99, 1.0):
        assert finalize_notebooks.bar(fraction) == format(Bar(fraction, 10, charset=Bar.UTF)), fraction


def test_finalize_without_widget_state_drops_the_view_and_keeps_the_fallback():
    nb = synthetic_notebook()
    del nb["metadata"]["widgets"]
    counts = finalize_notebooks.finalize_notebook(nb)
    assert counts["bars"] == 0 and counts["other_widgets"] == 4
    assert nb["cells"][0]["outputs"][0]["data"] == {"text/plain": "training:   0%|          | 0/3800 [00:00<?, ?it/s]"}


@pytest.mark.slow
def test_finalize_on_a_notebook_executed_by_jupyter(tmp_path):
    """A real run: `jupyter execute` (nbclient) of a tqdm.auto loop stores the widget state; the
    finalized text/plain shows the bar at 100% with its postfix, and no widget is left."""
    jupyter = Path(sys.executable).with_name("jupyter")
    if not jupyter.exists() and not shutil.which("jupyter"):
        pytest.skip("jupyter is not installed")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipywidgets")
    code = ("from tqdm.auto import tqdm\n"
            "bar = tqdm(range(30), desc='training')\n"
            "for i in bar:\n"
            "    bar.set_postfix(loss=0.041, refresh=False)\n"
            "for _ in tqdm(range(4), desc='hidden', leave=False):\n"
            "    pass\n"
            "print('done')")
    path = tmp_path / "bars.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]), path)
    proc = subprocess.run([str(jupyter), "execute", "--inplace", str(path)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    executed = load(path)
    assert STATE in executed["metadata"]["widgets"], "nbclient did not store the widget state"
    initial = [source({"source": o["data"]["text/plain"]}) for o in executed["cells"][0]["outputs"]
               if VIEW in o.get("data", {})]
    assert any("0%|" in t for t in initial)                    # what the fallback alone would have shown

    counts = finalize_notebooks.finalize(path)
    outputs = load(path)["cells"][0]["outputs"]
    texts = [source({"source": o["data"]["text/plain"]}) for o in outputs if "data" in o]
    assert counts["bars"] == 1 and counts["hidden"] == 1 and counts["state"] == 1
    assert len(texts) == 1 and re.fullmatch(r"training: 100%\|██████████\| 30/30 \[\d\d:\d\d<00:00, +[\d.]+it/s, "
                                            r"loss=0\.041\]", texts[0]), texts
    assert [source({"source": o["text"]}) for o in outputs if o["output_type"] == "stream"] == ["done\n"]
    assert VIEW not in path.read_text() and "widgets" not in load(path)["metadata"]


def committed_glue_names(nb: dict) -> set:
    """Names whose values the committed outputs hold (myst-nb's glue writes metadata.scrapbook.name):
    what the book, built with execute_notebooks: off, can show."""
    return {out.get("metadata", {}).get("scrapbook", {}).get("name")
            for cell in nb["cells"] if cell["cell_type"] == "code" for out in cell.get("outputs", [])} - {None}


@by_stem
def test_every_glue_reference_has_a_committed_value(path):
    """The book shows committed outputs only: a name glued in code but not in the outputs (the
    chapter was edited, not re-executed) fails the book build with "No key ... in glue data"."""
    nb = load(path)
    have = committed_glue_names(nb)
    missing = {}
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            text = source(cell)
            for name in dict.fromkeys(n.strip() for n in GLUE_ROLE.findall(text) + GLUE_DIRECTIVE.findall(text)):
                if name not in have:
                    missing.setdefault(i, []).append(name)
    assert not missing, (f"{path.name}: glue references without a value in the committed outputs (re-execute "
                         f"the chapter): " + "; ".join(f"cell {i}: {', '.join(names)}" for i, names in missing.items()))
