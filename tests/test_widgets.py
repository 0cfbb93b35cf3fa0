"""The static HTML slider and the live ipywidgets slider (ddpm_tutorial/widgets.py).

The browser side (does the slider move?) is tests/test_browser.py.
"""
import base64
import io
import re
import sys
from html.parser import HTMLParser

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_tutorial.widgets import frames_to_png, live_slider, slider, slider_html

DATA_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")


def noisy_frames(n=5, size=28):
    """Distinct grayscale frames (C, H, W) in [0, 1], as a model would give them."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, size, size, generator=g)


class Tags(HTMLParser):
    """Every start tag as (name, attrs dict), plus the text of the label span."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.label, self._in_label = [], None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        self._in_label = "ddpm-slider-label" in (attrs.get("class") or "")

    def handle_data(self, data):
        if self._in_label:
            self.label, self._in_label = data, False

    def find(self, tag):
        return [attrs for name, attrs in self.tags if name == tag]


def decode(uri):
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_html_structure():
    frames, labels = noisy_frames(5), [f"t = {t}" for t in range(0, 1000, 200)]
    text = slider_html(frames, labels, title="Forward process")
    page = Tags(text)

    (root,) = [a for a in page.find("div") if "data-ddpm-slider" in a]
    assert root["data-ddpm-slider"] == "5" and root["id"]
    (rng,) = page.find("input")
    assert (rng["type"], rng["min"], rng["max"], rng["value"]) == ("range", "0", "4", "0")
    # Frame 0 shows without scripts: the img starts on it, with its label.
    (img,) = page.find("img")
    png0 = decode(img["src"])
    assert png0.format == "PNG" and png0.size == (28, 28) and png0.mode == "L"
    assert img["src"] == "data:image/png;base64," + base64.b64encode(frames_to_png(frames)[0]).decode()
    assert page.label == "t = 0"
    assert "image-rendering:pixelated" in img["style"] and int(img["width"]) > 28
    # Every frame and every label is embedded, once in the script's array.
    script = text.split("<script>", 1)[1]
    uris = DATA_URI.findall(script)
    assert len(uris) == 5 and [decode(u).size for u in uris] == [(28, 28)] * 5
    assert len(set(uris)) == 5 and uris[0] == img["src"]
    assert all(f'"{label}"' in script for label in labels)
    assert "Forward process" in text


def test_no_external_urls():
    text = slider_html(noisy_frames(3), ["a", "b", "c"], title="t")
    rest = DATA_URI.sub("", text)  # base64 may contain '//' by chance
    assert "http" not in rest and "//" not in rest
    for _, attrs in Tags(text).tags:
        for key in ("src", "href"):
            assert key not in attrs or attrs[key].startswith("data:")


def test_ids_unique():
    ids = [Tags(slider_html(noisy_frames(2), ["a", "b"])).find("div")[0]["id"] for _ in range(2)]
    assert ids[0] != ids[1]


def test_labels_and_title_are_escaped():
    text = slider_html(noisy_frames(2), ["</script><b>", "x"], title="<i>")
    assert "</script><b>" not in text and "<i>" not in text
    assert text.count("</script>") == 1


def test_png_is_compact_and_not_upscaled():
    x = torch.linspace(0, 1, 28 * 28).reshape(28, 28)  # smooth, like a real image
    (png,) = frames_to_png([x])
    assert Image.open(io.BytesIO(png)).size == (28, 28) and len(png) < 600
    (big,) = frames_to_png([x], scale=3)
    assert Image.open(io.BytesIO(big)).size == (84, 84)


@pytest.mark.parametrize("frame, mode", [
    (np.random.rand(8, 9), "L"),
    (np.random.rand(8, 9, 3), "RGB"),
    (np.random.rand(8, 9, 4), "RGBA"),
    ((np.random.rand(8, 9, 3) * 255).astype(np.uint8), "RGB"),
    (torch.rand(3, 8, 9), "RGB"),   # channel-first torch tensors are accepted
    (torch.rand(1, 8, 9), "L"),
    (torch.rand(8, 9, dtype=torch.float16), "L"),
])
def test_frame_kinds(frame, mode):
    (png,) = frames_to_png([frame])
    im = Image.open(io.BytesIO(png))
    assert (im.size, im.mode) == ((9, 8), mode)


def test_figure_frames():
    figs = []
    for k in range(2):
        fig, ax = plt.subplots(figsize=(2, 1.5))
        ax.plot([0, k])
        figs.append(fig)
    pngs = frames_to_png(figs)
    assert {Image.open(io.BytesIO(p)).size for p in pngs} == {(160, 120)}
    assert pngs[0] != pngs[1]
    assert not plt.get_fignums()  # closed, so the inline backend won't show them again


@pytest.mark.parametrize("frames, labels, error, match", [
    ([], [], ValueError, "frames is empty"),
    (noisy_frames(3), ["a", "b"], ValueError, "got 3 frames but 2 labels"),
    (noisy_frames(2), "ab", TypeError, "not a single string"),
    ([np.zeros((2, 28, 28))], ["a"], ValueError, r"frame 0 has shape \(2, 28, 28\): expected \(H, W\)"),
    (np.zeros((28, 28)), ["a"] * 28, ValueError, "wrap a single image in a list"),
    ([np.zeros((28, 28)), np.zeros((32, 32))], ["a", "b"], ValueError,
     "frame 1 is 32x32 pixels .* but frame 0 is 28x28"),
    ([np.full((4, 4), -1.0)], ["a"], ValueError, r"frame 0 has values in \[-1, -1\].*\[0, 1\]"),
    ([np.full((4, 4), 1.01)], ["a"], ValueError, r"must lie in \[0, 1\]"),
    ([np.full((4, 4), np.nan)], ["a"], ValueError, "NaN"),
    ([np.zeros((4, 4), dtype=np.int64)], ["a"], TypeError, "dtype int64: expected float in"),
])
def test_bad_input(frames, labels, error, match):
    with pytest.raises(error, match=match):
        slider_html(frames, labels)


def test_tiny_overshoot_is_clipped():
    (png,) = frames_to_png([np.full((2, 2), 1 + 1e-6)])
    assert np.asarray(Image.open(io.BytesIO(png))).max() == 255


def test_slider_returns_html_object():
    obj = slider(noisy_frames(2), ["a", "b"])
    assert 'data-ddpm-slider="2"' in obj._repr_html_()


def test_live_slider_moves():
    widgets = pytest.importorskip("ipywidgets", reason="ipywidgets is not installed")

    def walk(w):
        yield w
        for child in getattr(w, "children", ()):
            yield from walk(child)

    box = live_slider(noisy_frames(4), ["t = 0", "t = 1", "t = 2", "t = 3"], title="t")
    parts = list(walk(box))
    (step,) = [w for w in parts if isinstance(w, widgets.IntSlider)]
    (image,) = [w for w in parts if isinstance(w, widgets.Image)]
    (label,) = [w for w in parts if isinstance(w, widgets.Label)]
    assert (step.min, step.max, label.value) == (0, 3, "t = 0")
    first = bytes(image.value)
    step.value = 3
    assert bytes(image.value) != first and label.value == "t = 3"
    assert Image.open(io.BytesIO(bytes(image.value))).size == (28, 28)


def test_show_slider_live_without_a_kernel_falls_back_to_static(capsys):
    """Plain Python (this test process) has no kernel: live=True shows the static slider."""
    from ddpm_tutorial import widgets
    assert widgets._kernel_attached() is False
    widgets.show_slider(noisy_frames(2), ["a", "b"], live=True)     # no NameError, no widget
    assert "HTML object" in capsys.readouterr().out


def test_show_slider_live_without_ipywidgets_warns_and_shows_static(monkeypatch, capsys):
    from ddpm_tutorial import widgets
    monkeypatch.setattr(widgets, "_kernel_attached", lambda: True)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)          # import ipywidgets -> ImportError
    with pytest.warns(UserWarning, match=r"needs ipywidgets \(pip install ipywidgets\); showing the static"):
        widgets.show_slider(noisy_frames(2), ["a", "b"], live=True)
    assert "HTML object" in capsys.readouterr().out


LIVE_CELL = """\
import numpy as np
import ipywidgets
from ddpm_tutorial.widgets import show_slider, _kernel_attached

assert _kernel_attached()
frames = np.random.default_rng(0).random((3, 8, 8))
show_slider(frames, ["t = 0", "t = 1", "t = 2"], title="live", live=True)
print("ipywidgets", ipywidgets.__version__)"""


@pytest.mark.slow
def test_show_slider_live_in_a_real_kernel():
    """Starts an ipykernel (nbclient), runs show_slider(live=True) there and checks that the
    kernel displayed a widget view and opened comms for the slider's widget models."""
    pytest.importorskip("ipywidgets", reason="ipywidgets is not installed")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(LIVE_CELL)])
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120, store_widget_state=True)
    client.execute()        # raises CellExecutionError on any error in the cell

    outputs = nb.cells[0].outputs
    assert not [o for o in outputs if o["output_type"] == "error"], outputs
    views = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) == 1, f"show_slider(live=True) displayed no widget view: {outputs}"
    assert not [o for o in outputs if "text/html" in o.get("data", {})], "fell back to the static slider"
    # The comms the kernel opened, as nbclient recorded them: one model per widget of the box.
    state = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
    models = [m["model_name"] for m in state.values()]
    assert {"VBoxModel", "ImageModel", "IntSliderModel", "LabelModel"} <= set(models), models
    view_id = views[0]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
    assert state[view_id]["model_name"] == "VBoxModel"
    (slider_state,) = [m["state"] for m in state.values() if m["model_name"] == "IntSliderModel"]
    assert (slider_state["min"], slider_state["max"], slider_state["description"]) == (0, 2, "live")
