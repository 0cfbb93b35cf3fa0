"""Colab, one of the three ways the book is used (DESIGN.md sections 7 and 10).

Every chapter carries an "Open in Colab" badge pointing at itself and the one shared set-up
cell of tools/colab_setup.py, built from repository.url in _config.yml. The last test runs
chapters 01 and 03 in a simulated Colab: a fresh environment holding what Colab preinstalls
(torch, torchvision, numpy, matplotlib, tqdm, ipykernel, ipywidgets 7.7) but not the
package, a stand-in ``google.colab`` module imported at kernel start, and the set-up cell's
URL pointed at a git snapshot of the checkout under test, uncommitted changes included.
Chapter 01 reads Fashion-MNIST and draws sliders (live ones with a kernel); chapter 03 loads
the network shipped with the package (``chapter_model``, in a folder with no chapter-4
checkpoint), so the package data must have come with the install. Between them they use all
that a later chapter needs from the install, in seconds (chapter 05 would add a minute of
sampling and nothing the install must provide).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import colab_setup  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SIMULATED_CHAPTERS = ("01_forward_process", "03_unet")


def config_repository() -> tuple[str, str]:
    """repository.url and .branch read from _config.yml here, independently of the tool."""
    text = (ROOT / "_config.yml").read_text()
    block = re.search(r"^repository:\n((?:[ \t]+.*\n)+)", text, re.M).group(1)
    url = re.search(r"^\s+url:\s*(\S+)", block, re.M).group(1)
    branch = re.search(r"^\s+branch:\s*(\S+)", block, re.M).group(1)
    return url, branch


def cell_text(cell) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


# --- the badge --------------------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_badges_open_the_chapter_and_its_practice_notebook_in_colab(path):
    """The first line: "Open in Colab" (the complete chapter), then "Practise in Colab" (the same
    chapter with its solutions blanked, practice/<name>, written by tools/make_practice.py)."""
    nb = json.loads(path.read_text())
    first_md = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
    top = cell_text(first_md).split("\n", 1)[0]
    badge = r'<a href="([^"]+)" target="_parent"><img src="(data:image/svg\+xml;base64,[A-Za-z0-9+/=]+)" alt="([^"]+)"/></a>'
    match = re.fullmatch(f"{badge} {badge}", top)
    assert match, (f"{path.name}: the first line of the first markdown cell is not the two Colab links "
                   f"(run python tools/colab_setup.py --write notebooks/*.ipynb): {top[:80]!r}")
    url, branch = config_repository()
    blob = f"https://colab.research.google.com/github/{url.split('github.com/')[1]}/blob/{branch}"
    assert match.groups() == (f"{blob}/notebooks/{path.name}", colab_setup.BADGE_IMAGE, "Open the complete chapter in Colab",
                              f"{blob}/practice/{path.name}", colab_setup.PRACTICE_BADGE_IMAGE, "Practise in Colab"), \
        f"{path.name}: the links are {match.group(1)} and {match.group(4)}"


def test_badge_images_are_inline_svg():
    """The images are data: URIs, so the offline book makes no request for them."""
    import base64
    import xml.etree.ElementTree as ET
    for image, words in ((colab_setup.BADGE_IMAGE, "Open in Colab"), (colab_setup.PRACTICE_BADGE_IMAGE, "Practise in Colab")):
        assert image.startswith("data:image/svg+xml;base64,")
        svg = ET.fromstring(base64.b64decode(image.split(",", 1)[1]))
        assert svg.tag.endswith("svg") and words in "".join(svg.itertext())


# --- the set-up cell --------------------------------------------------------------------


def test_setup_cell_installs_repository_url_at_branch():
    url, branch = config_repository()
    source = colab_setup.setup_cell_source()
    defaults = re.findall(r'os\.environ\.get\("DDPM_REPO_URL", "([^"]+)"\)', source)
    assert defaults == [f"git+{url}@{branch}"], f"the cell installs {defaults}, _config.yml names {url}@{branch}"
    assert source.startswith(colab_setup.SETUP_MARK)


def test_setup_cell_never_installs_or_pins_torch():
    source = colab_setup.setup_cell_source()
    # Shell escapes and magics are the only ways a cell installs; strings and comments only advise.
    installs = [line.strip() for line in source.splitlines() if re.match(r"\s*[%!]", line)]
    assert installs == ["%pip install -q {REPO_URL}"], installs
    assert "subprocess" not in source and "-m pip" not in source
    assert "torch" not in colab_setup.repo_spec()
    # Nor may the package itself: pip would replace Colab's CUDA build of torch.
    deps = re.search(r"^dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    for dep in re.findall(r'"((?:torch|torchvision)\b[^"]*)"', deps):
        assert not re.search(r"==|<|~=|!=", dep), f"pyproject.toml pins {dep}: Colab's torch must stay"


class FakeShell:
    """Records the line magics the cell calls, as IPython's get_ipython() would run them."""

    def __init__(self):
        self.magics = []

    def run_line_magic(self, name, line, _stack_depth=1):
        self.magics.append((name, line))


def run_setup_cell(source: str) -> tuple[FakeShell, dict, str]:
    from IPython.core.inputtransformer2 import TransformerManager
    shell = FakeShell()
    code = compile(TransformerManager().transform_cell(source), "<setup cell>", "exec")
    namespace = {"get_ipython": lambda: shell}
    out = io.StringIO()
    with redirect_stdout(out):
        exec(code, namespace)
    return shell, namespace, out.getvalue()


def test_setup_cell_outside_colab_installs_nothing_and_prints_the_runtime(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setenv("DDPM_QUICK", "1")
    shell, _, out = run_setup_cell(colab_setup.setup_cell_source())
    assert shell.magics == []
    assert re.search(r"^Runtime: (GPU \S|CPU\. For a GPU on Colab: Runtime → Change runtime type → T4 GPU)",
                     out, re.M), out
    assert "Preset: quick" in out, out


def test_setup_cell_on_colab_installs_from_the_url_it_is_given(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    monkeypatch.setenv("DDPM_REPO_URL", "git+file:///somewhere/else@main")
    shell, namespace, out = run_setup_cell(colab_setup.setup_cell_source())
    assert shell.magics == [("pip", "install -q {REPO_URL}")]   # IPython expands {REPO_URL}
    assert namespace["REPO_URL"] == "git+file:///somewhere/else@main"
    monkeypatch.delenv("DDPM_REPO_URL")
    _, namespace, _ = run_setup_cell(colab_setup.setup_cell_source())
    assert namespace["REPO_URL"] == colab_setup.repo_spec()


def test_setup_cell_failure_says_what_failed_the_url_and_what_to_do(monkeypatch):
    """A failed install (pip's own output shows above) ends in one clear message, not in
    a ModuleNotFoundError two cells later."""
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    monkeypatch.setitem(sys.modules, "ddpm_tutorial.config", None)   # as if pip had failed
    monkeypatch.delenv("DDPM_REPO_URL", raising=False)
    with pytest.raises(ImportError) as info:
        run_setup_cell(colab_setup.setup_cell_source())
    message = str(info.value)
    assert colab_setup.repo_spec() in message
    assert "zip" in message and "DDPM_REPO_URL" in message and "failed" in message
    monkeypatch.delitem(sys.modules, "google.colab")
    with pytest.raises(ImportError, match=r"pip install -e \."):
        run_setup_cell(colab_setup.setup_cell_source())


def test_write_then_check(tmp_path):
    """--check fails on an unstamped chapter; --write fixes it, replaces the old set-up cell,
    keeps one badge, and is idempotent."""
    nb = {"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": [   # with the single badge of an earlier version
            '<a href="https://colab.research.google.com/github/a/b/blob/main/notebooks/x.ipynb" target="_parent">'
            '<img src="data:image/svg+xml;base64,AAAA" alt="Open In Colab"/></a>\n', "\n", "# Title\n", "text"]},
        {"cell_type": "code", "execution_count": 1, "metadata": {}, "outputs": [],
         "source": ["# Colab set-up: the old one\n", "import subprocess"]},
        {"cell_type": "code", "execution_count": 2, "metadata": {}, "outputs": [], "source": ["x = 1"]}],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "09_new_chapter.ipynb"
    path.write_text(json.dumps(nb))
    assert colab_setup.main(["--check", str(path)]) == 1
    assert colab_setup.main(["--write", str(path)]) == 0
    assert colab_setup.main(["--check", str(path)]) == 0
    stamped = path.read_text()
    assert colab_setup.main(["--write", str(path)]) == 0 and path.read_text() == stamped
    cells = json.loads(stamped)["cells"]
    assert len(cells) == 3 and cell_text(cells[0]).count(colab_setup.BADGE_ALT) == 1
    assert cell_text(cells[0]).count(colab_setup.PRACTICE_ALT) == 1 and "Open In Colab" not in cell_text(cells[0])
    assert cell_text(cells[0]).endswith("# Title\ntext")
    assert cell_text(cells[1]) == colab_setup.setup_cell_source() and cells[1]["execution_count"] == 1
    assert "notebooks/09_new_chapter.ipynb" in cell_text(cells[0]) and "practice/09_new_chapter.ipynb" in cell_text(cells[0])


# --- the simulated Colab ----------------------------------------------------------------

# Entries of this environment's site-packages that the simulated Colab must not see: the
# package under test (its set-up cell must install it) and ipywidgets 8 (Colab has 7.7).
HIDDEN = re.compile(r"^(ddpm_tutorial|__editable__|ipywidgets|widgetsnbextension|jupyterlab_widgets)"
                    r"|\.pth$|^__pycache__$", re.I)


def git(*args, cwd, **kw) -> str:
    return subprocess.run(["git", "-c", "user.name=simulated-colab", "-c", "user.email=colab@localhost",
                           "-c", "commit.gpgsign=false", *args], cwd=cwd, check=True,
                          capture_output=True, text=True, **kw).stdout


def snapshot_of_the_checkout(dest: Path) -> str:
    """A fresh git repository at ``dest`` whose branch main holds the working tree as it is
    now: the tracked files (uncommitted changes included) and new files in ddpm_tutorial/ (a
    module not yet added). Returns what the set-up cell should give pip."""
    tracked = git("ls-files", "-z", cwd=ROOT).split("\0")
    new = git("ls-files", "-z", "--others", "--exclude-standard", "--", "ddpm_tutorial", cwd=ROOT).split("\0")
    for name in filter(None, tracked + new):
        if (ROOT / name).is_file():          # not if deleted in the working tree
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    git("init", "-q", "-b", "main", cwd=dest)
    git("add", "-A", cwd=dest)
    git("commit", "-q", "-m", "simulated-Colab snapshot of the working tree", cwd=dest)
    return f"git+{dest.as_uri()}@main"


def simulated_colab(root: Path) -> tuple[Path, Path]:
    """A virtual environment that sees what Colab preinstalls and not ddpm_tutorial.

    Installing torch again would cost gigabytes, so the new environment reuses this one's
    packages through symbolic links in one folder, which a .pth file puts on its path after
    its own site-packages; ipywidgets 7.7 (Colab's) is installed into the new environment
    itself. A stand-in google.colab module is importable, and an IPython start-up file
    imports it in every kernel, as Colab's kernel does. Returns (python, kernel folder).
    """
    venv = root / "colab-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())
    preinstalled = root / "preinstalled"
    preinstalled.mkdir()
    for folder in dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]):
        for entry in Path(folder).iterdir():
            if not HIDDEN.search(entry.name) and not (preinstalled / entry.name).exists():
                (preinstalled / entry.name).symlink_to(entry)
    stub = root / "colab-stub" / "google" / "colab"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('"""Stand-in for the module Colab\'s kernel imports at start-up."""\n')
    (site / "colab_preinstalled.pth").write_text(f"{preinstalled}\n{stub.parent.parent}\n")
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "ipywidgets==7.7.*"],
                         capture_output=True, text=True)
    assert pip.returncode == 0, f"installing ipywidgets 7.7 into the simulated Colab failed:\n{pip.stderr[-3000:]}"

    startup = root / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-colab.py").write_text("import google.colab  # what Colab's kernel does at start-up\n")
    kernels = root / "kernels"
    (kernels / "colab-sim").mkdir(parents=True)
    (kernels / "colab-sim" / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "simulated Colab", "language": "python",
        "env": {"IPYTHONDIR": str(root / "ipython"), "PYTHONPATH": "", "PYTHONNOUSERSITE": "1",
                "DDPM_QUICK": "1"}}))
    return python, kernels


def probe(python: Path, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd="/", env=env)


def execute(nb: dict, path: Path, kernels: Path, repo_spec: str) -> dict:
    """Run a notebook to the end in a fresh simulated-Colab kernel, as Colab's "Run all"
    does; the executed notebook is left at ``path`` for a look after a failure."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    spec_file = kernels / "colab-sim" / "kernel.json"
    spec = json.loads(spec_file.read_text())
    spec["env"]["DDPM_REPO_URL"] = repo_spec
    spec_file.write_text(json.dumps(spec))
    nb = nbformat.reads(json.dumps(nb), as_version=4)   # sources as strings, as nbformat.read gives
    km = KernelManager(kernel_name="colab-sim", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    try:
        NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        nbformat.write(nb, path)
    return nb


def stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell["outputs"] if o["output_type"] == "stream")


LIVE_SLIDER_CELL = """\
# simulated-Colab test: the live slider, with a kernel attached and Colab's ipywidgets 7.7
import ipywidgets
import torch
from ddpm_tutorial.widgets import show_slider

assert ipywidgets.__version__.startswith("7.7."), ipywidgets.__version__
show_slider(torch.rand(3, 1, 8, 8), ["t = 0", "t = 1", "t = 2"], title="live", live=True)"""


def chapter(name: str) -> dict:
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    return colab_setup.stamp(nb, f"notebooks/{name}.ipynb")


@pytest.mark.slow
@pytest.mark.colab
def test_chapters_run_in_simulated_colab(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout: the package is installed from a git URL")
    start = time.perf_counter()
    repo_spec = snapshot_of_the_checkout(tmp_path / "repo")
    python, kernels = simulated_colab(tmp_path / "env")
    before = probe(python, "import ipywidgets, torch, google.colab; print(ipywidgets.__version__); "
                           "import ddpm_tutorial")
    assert "No module named 'ddpm_tutorial'" in before.stderr, \
        f"the simulated Colab must not see the package before its set-up cell runs:\n{before.stderr[-2000:]}"
    assert before.stdout.startswith("7.7."), before.stdout

    # 1. An install that fails ends in one clear message at the set-up cell.
    nb = chapter(SIMULATED_CHAPTERS[0])
    nb["cells"] = nb["cells"][:nb["cells"].index(next(c for c in nb["cells"] if c["cell_type"] == "code")) + 1]
    bad = f"git+{(tmp_path / 'no-such-repo').as_uri()}@main"
    from nbclient.exceptions import CellExecutionError
    with pytest.raises(CellExecutionError) as info:
        execute(nb, tmp_path / "failed_install.ipynb", kernels, bad)
    message = str(info.value)
    assert "ImportError" in message and bad in message and "zip" in message, message[-3000:]
    failed = json.loads((tmp_path / "failed_install.ipynb").read_text())
    assert "ERROR" in json.dumps(failed["cells"][-1]["outputs"]), "pip's own error should show above"

    # 2. The chapters run end to end from the set-up cell's install.
    for k, name in enumerate(SIMULATED_CHAPTERS):
        nb = chapter(name)
        if k == 0:
            nb["cells"].append({"cell_type": "code", "execution_count": None, "id": "colab-live-slider",
                                "metadata": {}, "outputs": [], "source": LIVE_SLIDER_CELL})
        ran = execute(nb, tmp_path / f"{name}.ipynb", kernels, repo_spec)
        code = [c for c in ran.cells if c.cell_type == "code"]
        setup = stream_text(code[0])
        assert "Runtime: CPU. For a GPU on Colab: Runtime → Change runtime type → T4 GPU" in setup, setup
        assert "Preset: quick" in setup, setup
        assert "ERROR" not in setup, setup
        if k == 0:
            views = [o for o in code[-1].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
            assert views, f"show_slider(live=True) in a kernel showed no ipywidgets view: {code[-1].outputs}"
        if any("chapter_model(" in c.source for c in code):
            printed = "".join(stream_text(c) for c in code)
            assert "the checkpoint shipped with the package" in printed, \
                f"{name}: chapter_model did not load the shipped network in the simulated Colab"

    where = probe(python, "import ddpm_tutorial; print(ddpm_tutorial.__file__)")
    assert where.stdout.startswith(str(tmp_path / "env" / "colab-venv")), where.stdout + where.stderr
    print(f"simulated Colab: {time.perf_counter() - start:.0f} s")
