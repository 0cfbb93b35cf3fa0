"""The committed notebooks: Colab-ready, agreeing with _config.yml, with outputs of a full run."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import colab_setup  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CHAPTERS = ["01_forward_process", "02_time_embeddings", "03_unet", "04_training", "05_sampling",
            "06_fast_sampling", "07_skip_connection_ablation", "08_guidance"]


def repo_url() -> str:
    return re.search(r"^\s*url:\s*(\S+)", (ROOT / "_config.yml").read_text(), re.M).group(1)


def load(path):
    return json.loads(path.read_text())


def test_every_chapter_exists_and_is_in_the_toc():
    toc = (ROOT / "_toc.yml").read_text()
    for name in CHAPTERS:
        assert (ROOT / "notebooks" / f"{name}.ipynb").exists(), name
        assert f"notebooks/{name}" in toc, name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_setup_cell_matches_config(path):
    """The first code cell is the shared set-up cell of tools/colab_setup.py, which installs
    from repository.url (tests/test_colab.py checks that text and runs it in a simulated Colab)."""
    nb = load(path)
    setup = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
    assert setup == colab_setup.setup_cell_source(), (
        f"{path.name}: the set-up cell is not the shared one; run "
        "python tools/colab_setup.py --write notebooks/*.ipynb")
    assert f'"git+{repo_url()}@' in setup
    assert nb["metadata"].get("accelerator") == "GPU" and nb["metadata"]["colab"]["gpuType"] == "T4"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_come_from_a_full_run(path):
    nb = load(path)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert all(counts), f"{path.name}: unexecuted cells (execution_count {counts})"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), f"{path.name}: out of order {counts}"
    outputs = [o for c in code for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"], f"{path.name} holds an error output"
    text = json.dumps(outputs)
    runs = re.findall(r"preset '(\w+)' \(", text)     # runinfo.describe_run's line
    assert runs, f"{path.name} does not print which preset produced its outputs"
    assert all(p in ("cpu", "gpu") for p in runs), f"{path.name}: outputs of the preset(s) {runs}, not a full run"
    assert "application/vnd.jupyter.widget-state+json" not in json.dumps(nb["metadata"])
    assert "widgets" not in nb["metadata"], f"{path.name}: leftover widget state in metadata"
    assert "application/vnd.jupyter.widget-view+json" not in text, \
        f"{path.name}: a widget view would render dead in the book (run tools/finalize_notebooks.py)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_displayed_package_source_is_current(path):
    """Every ``show_source(obj)`` output shows the package's code as it is now, not as it was
    when the chapter ran (fix: python tools/refresh_sources.py notebooks/*.ipynb)."""
    import nbformat
    import refresh_sources
    stale = refresh_sources.stale_cells(nbformat.read(path, as_version=4), refresh_sources.namespace())
    assert not stale, f"{path.name}: stale source of {[expr for _, expr, _, _ in stale]}"


def test_refresh_sources_finds_a_stale_output():
    import nbformat
    import refresh_sources
    nb = nbformat.read(ROOT / "notebooks" / "04_training.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "show_source(Trainer.train_step)" in c.source)
    out = next(o for o in cell.outputs if "text/markdown" in o.get("data", {}))
    out["data"]["text/markdown"] = out["data"]["text/markdown"].replace("draw_batch", "sample_batch")
    assert [expr for _, expr, _, _ in refresh_sources.stale_cells(nb, refresh_sources.namespace())] == \
        ["Trainer.train_step"]
