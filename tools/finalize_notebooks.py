"""Make executed notebooks fit to commit: progress-bar widgets become their plain-text form.

In a live kernel tqdm draws ipywidgets progress bars. Saved into a notebook they are widget
views whose state the static book cannot run (a dead widget), so each widget view is dropped
in favour of the text/plain fallback it carries ("training: 100%|####| 3000/3000 [...]"), and
the notebook-level widget state is removed.

    python tools/finalize_notebooks.py notebooks/04_training.ipynb [...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def finalize(path: Path) -> int:
    nb = json.loads(path.read_text())
    changed = 0
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data:
                del data[WIDGET_VIEW]
                changed += 1
    if nb.get("metadata", {}).pop("widgets", None) is not None:
        changed += 1
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return changed


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"{name}: {finalize(Path(name))} widget outputs/states removed")
