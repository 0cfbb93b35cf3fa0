"""Make executed notebooks fit to commit: progress-bar widgets become their FINAL plain-text form.

In a kernel, tqdm.auto draws an ipywidgets progress bar. Saved into a notebook it is a widget
view whose text/plain fallback is the bar as it was first displayed ("training:   0%|  | 0/3800"):
committed as is, the book would show every bar frozen at 0%. The bar's last state is kept
elsewhere: nbclient (``jupyter execute``, nbmake) stores every widget model's final state in
``metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]``. A tqdm bar is an
HBox whose three children are an HTML (the description and percentage, e.g. "training: 100%"),
a FloatProgress (value, max) and an HTML (the meter, " 3800/3800 [08:00<00:00, 7.90it/s,
loss=0.041]"), HTML-escaped and with figure spaces (U+2007) for spaces.

This script rewrites each bar's text/plain from that state ("training: 100%|██████████| 3800/3800
[...]"), drops the output of a bar that tqdm hid when it closed (``leave=False``), drops every
widget view (a dead widget in the static book) and the notebook-level widget state. Other widgets
keep their text/plain fallback.

    python tools/finalize_notebooks.py notebooks/04_training.ipynb [...]
"""
from __future__ import annotations

import html
import json
import sys
from pathlib import Path

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
BAR_WIDTH = 10                            # tqdm's bar width when it does not know the terminal's
BLOCKS = " ▏▎▍▌▋▊▉█"                      # tqdm's unicode bar: eighths of a cell


def _model(states: dict, ref) -> dict | None:
    """The state dict of the widget model that ``ref`` ("IPY_MODEL_<id>" or "<id>") names."""
    if not isinstance(ref, str):
        return None
    entry = states.get(ref.removeprefix("IPY_MODEL_"))
    return entry.get("state", {}) if isinstance(entry, dict) else None


def _text(value) -> str:
    """An HTML widget's value as plain text: entities decoded, figure spaces back to spaces."""
    return html.unescape(value or "").replace("\u2007", " ").replace("\xa0", " ")


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A unicode bar like tqdm's: ``width`` cells, each filled in eighths."""
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = int(fraction * width * 8)
    full, partial = divmod(eighths, 8)
    cells = "█" * full + (BLOCKS[partial] if full < width else "")
    return cells.ljust(width)


def tqdm_text(states: dict, model_id: str) -> str | None:
    """The final text of the tqdm bar whose HBox is ``model_id``; "" when tqdm hid the bar on
    closing (``leave=False``); None when the model is not a tqdm bar (or its state is missing)."""
    box = _model(states, model_id)
    children = box.get("children") if box else None
    if not isinstance(children, list) or len(children) != 3:
        return None
    entries = [states.get(c.removeprefix("IPY_MODEL_"), {}) if isinstance(c, str) else {} for c in children]
    kinds = [e.get("model_name") for e in entries]
    if kinds != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    left, progress, right = (e.get("state", {}) for e in entries)
    layout = _model(states, box.get("layout")) or {}
    if layout.get("visibility") == "hidden" or box.get("visible") is False:
        return ""
    left, right = _text(left.get("value")), _text(right.get("value"))
    if not left:                          # unknown total: tqdm shows only the meter, no bar
        return right.strip()
    total = progress.get("max") or 0
    fraction = (progress.get("value") or 0) / total if total else 1.0
    return f"{left}|{bar(fraction)}|{right}"


def finalize_notebook(nb: dict) -> dict:
    """Finalize a notebook (a dict as read from JSON) in place; returns counts of what changed."""
    metadata = nb.setdefault("metadata", {})
    widgets = metadata.get("widgets", {})
    states = widgets.get(WIDGET_STATE, {}).get("state", {}) if isinstance(widgets, dict) else {}
    counts = {"bars": 0, "hidden": 0, "other_widgets": 0, "state": 0}
    for cell in nb.get("cells", []):
        kept = []
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            view = data.pop(WIDGET_VIEW, None)
            if view is None:
                kept.append(output)
                continue
            text = tqdm_text(states, view.get("model_id"))
            if text == "":
                counts["hidden"] += 1
                continue                  # the live notebook shows nothing here either
            if text is None:
                counts["other_widgets"] += 1
            else:
                data["text/plain"] = text
                counts["bars"] += 1
            if not data:                  # a view without any fallback: nothing left to show
                continue
            kept.append(output)
        if "outputs" in cell:
            cell["outputs"] = kept
    if metadata.pop("widgets", None) is not None:
        counts["state"] = 1
    return counts


def finalize(path: Path) -> dict:
    path = Path(path)
    nb = json.loads(path.read_text())
    counts = finalize_notebook(nb)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return counts


def main(argv: list) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for name in argv:
        c = finalize(Path(name))
        print(f"{name}: {c['bars']} progress bars set to their final state, {c['hidden']} hidden bars "
              f"removed, {c['other_widgets']} other widget views reduced to text, "
              f"widget state {'removed' if c['state'] else 'absent'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
