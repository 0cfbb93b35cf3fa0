"""Timestep sliders that work everywhere (DESIGN.md, section 6).

A slider is a precomputed list of frames (images) plus one label per frame.
It is shown in one of two ways:

* ``slider`` / ``slider_html``: a self-contained HTML block. An
  ``<input type=range>``, every frame as a base64 PNG ``data:`` URI and a few
  lines of inline JavaScript that swap the image. There is no CDN, no kernel,
  no request of any kind, so the same output works in the static book, in
  JupyterLab, classic Notebook, VS Code and Colab. Where scripts do not run
  (an untrusted notebook in JupyterLab, GitHub's viewer) the first frame and
  its label still show; the range input stays disabled, so nothing looks alive
  that is not.
* ``live_slider``: an ipywidgets control, for a reader with a running kernel.
  Book chapters must not use it: an executed notebook keeps no widget state,
  so the rendered book would show a dead widget.

Frames stay at their own pixel size inside the PNGs (a 28x28 Fashion-MNIST
image is a few hundred bytes); the browser scales them up with
``image-rendering: pixelated`` so pixels stay sharp squares.
"""
from __future__ import annotations

import html
import io
import json
import struct
import sys
import uuid
import warnings
from base64 import b64encode

import numpy as np
from PIL import Image

FIGURE_DPI = 80         # matplotlib figures are rasterised at this dpi (times ``scale``)
TARGET_WIDTH = 560      # small frames are shown at the largest integer zoom <= this width
_RANGE_TOLERANCE = 1e-4  # float frames may overshoot [0, 1] by rounding error, no more

# The HTML and its script. Braces are doubled for str.format. The script finds
# its root through document.currentScript first: where an output is rendered
# twice on one page (two views of a notebook) the id alone would be ambiguous.
_HTML = """\
<div class="ddpm-slider" id="{id}" data-ddpm-slider="{n}" \
style="text-align:center;margin:0.8em auto;max-width:100%">\
{caption}\
<img src="{src0}" alt="{alt0}" width="{width}" height="{height}" \
style="display:block;margin:0 auto;max-width:100%;height:auto;{rendering}">\
<div style="display:flex;flex-wrap:wrap;align-items:center;justify-content:center;gap:0.3em 0.7em;margin-top:0.3em">\
<input type="range" min="0" max="{max}" step="1" value="0" disabled aria-label="{aria}" \
style="width:{slider_width}px;max-width:100%;min-width:160px;margin:0">\
<span class="ddpm-slider-label" style="font-family:monospace;font-size:0.9em;\
white-space:pre;text-align:left;max-width:100%;overflow-x:auto;min-width:{label_chars}ch">{label0}</span>\
</div>\
<script>(function () {{
  var s = document.currentScript, id = "{id}";
  var root = s && s.parentNode && s.parentNode.id === id ? s.parentNode : document.getElementById(id);
  if (!root) return;
  var frames = {frames}, labels = {labels}, title = {title_js};
  var img = root.querySelector("img"), input = root.querySelector("input");
  var label = root.querySelector(".ddpm-slider-label");
  function show() {{
    var i = Number(input.value);
    img.src = frames[i];
    img.alt = title ? title + ": " + labels[i] : labels[i];
    label.textContent = labels[i];
  }}
  input.addEventListener("input", show);
  input.addEventListener("change", show);
  input.disabled = false;
  show(); /* a reloaded page may have restored the input's old position */
}})();</script>\
</div>"""


def frames_to_png(frames, scale: int = 1) -> list[bytes]:
    """Encode each frame as PNG bytes, at the frame's own pixel size.

    ``frames`` is a sequence (list, numpy array or torch tensor, iterated along
    its first axis) whose items are any of:

    * a numpy array ``(H, W)`` (grayscale) or ``(H, W, 3)`` / ``(H, W, 4)``
      (RGB / RGBA), float in [0, 1] or uint8 in [0, 255];
    * a torch tensor of those shapes or channel-first ``(1, H, W)`` /
      ``(3, H, W)``, the layout a model produces (a 3-D tensor whose first
      axis is 1 or 3 is read as channel-first);
    * a matplotlib ``Figure``, rasterised at ``FIGURE_DPI * scale`` dpi and
      then closed, so that Jupyter's inline backend does not show it again.

    Images in [-1, 1], as the diffusion model sees them, are rejected: map them
    with ``(x + 1) / 2`` first. ``scale`` repeats every pixel ``scale`` times
    along each axis; keep it at 1 for sliders, whose HTML scales with CSS.
    All frames must have the same size.
    """
    if not (isinstance(scale, int) and scale >= 1):
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if isinstance(frames, (str, bytes)) or not hasattr(frames, "__iter__"):
        raise TypeError(f"frames must be a sequence of images (a list, an array or a tensor), "
                        f"got {type(frames).__name__}")
    frames = list(frames)
    if not frames:
        raise ValueError("frames is empty: expected at least one image")
    arrays = [_to_uint8(frame, i, scale) for i, frame in enumerate(frames)]
    for i, a in enumerate(arrays):
        if a.shape[:2] != arrays[0].shape[:2]:
            raise ValueError(
                f"frame {i} is {a.shape[0]}x{a.shape[1]} pixels (HxW) but frame 0 is "
                f"{arrays[0].shape[0]}x{arrays[0].shape[1]}: all frames must have the same size")
    return [_encode(a) for a in arrays]


def slider_html(frames, labels, title: str | None = None, width: int | None = None) -> str:
    """A self-contained HTML slider over ``frames`` (see ``frames_to_png``).

    ``labels`` holds one string per frame (e.g. ``f"t = {t}"``), shown beside
    the slider in monospace. ``width`` is the display width of the image in
    CSS pixels; by default small frames are zoomed by the largest integer
    factor that keeps them within ``TARGET_WIDTH`` and larger ones are shown at
    their own size. The outer ``<div>`` carries ``data-ddpm-slider`` (its value
    is the number of frames) and a fresh unique id, so several sliders can
    share a page and tests can find them.
    """
    _check_title(title)
    pngs = frames_to_png(frames)
    labels = _check_labels(labels, len(pngs))
    w, h = _png_size(pngs[0])
    width = _display_width(w, width)
    uris = ["data:image/png;base64," + b64encode(p).decode("ascii") for p in pngs]
    esc = html.escape
    return _HTML.format(
        id=f"ddpm-slider-{uuid.uuid4().hex[:12]}",
        n=len(uris),
        max=len(uris) - 1,
        caption=(f'<div style="font-size:0.85em;opacity:0.75;margin-bottom:0.3em">{esc(title)}</div>'
                 if title else ""),
        src0=uris[0],
        alt0=esc(f"{title}: {labels[0]}" if title else labels[0]),
        width=width,
        height=round(h * width / w),
        # Pixelated only when zooming in: shrinking a figure that way looks jagged.
        rendering="image-rendering:crisp-edges;image-rendering:pixelated" if width > w else "",
        aria=esc(title or "frame"),
        slider_width=max(width, 160),
        label_chars=min(80, max(len(line) for label in labels for line in label.split("\n"))),
        label0=esc(labels[0]),
        frames=_js(uris),
        labels=_js(labels),
        title_js=_js(title or ""),
    )


def slider(frames, labels, title: str | None = None, width: int | None = None):
    """``slider_html`` wrapped in ``IPython.display.HTML``; as the last line
    of a cell it displays itself."""
    from IPython.display import HTML

    return HTML(slider_html(frames, labels, title=title, width=width))


def live_slider(frames, labels, title: str | None = None, width: int | None = None):
    """The same slider as an ipywidgets ``VBox`` (needs a kernel to move).

    Only APIs present in both ipywidgets 7.7 (Colab) and 8 are used. The
    frames are encoded once here; moving the slider only swaps bytes.
    """
    import ipywidgets as widgets  # lazily: the static slider must not need it

    _check_title(title)
    pngs = frames_to_png(frames)
    labels = _check_labels(labels, len(pngs))
    w, _ = _png_size(pngs[0])
    width = _display_width(w, width)
    image = widgets.Image(value=pngs[0], format="png", width=str(width))
    # Widgets have no image-rendering option; a class plus a <style> gives one.
    image.add_class("ddpm-pixelated")
    style = widgets.HTML("<style>.ddpm-pixelated { image-rendering: pixelated; }</style>")
    step = widgets.IntSlider(value=0, min=0, max=len(pngs) - 1, step=1, readout=False,
                             description=title or "", continuous_update=True)
    label = widgets.Label(value=labels[0])

    def on_change(change):
        image.value = pngs[change["new"]]
        label.value = labels[change["new"]]

    step.observe(on_change, names="value")
    return widgets.VBox([style, image, widgets.HBox([step, label])])


def show_slider(frames, labels, title: str | None = None, live: bool = False,
                width: int | None = None) -> None:
    """Display a slider: static HTML by default, ipywidgets if ``live`` and a
    kernel is attached (without one, ``live`` falls back to the static HTML).

    Returns None on purpose: returning the displayed object would make a
    notebook show it twice when the call is the last line of a cell. Use
    ``slider`` or ``live_slider`` to get the object itself.
    """
    from IPython.display import display

    make = live_slider if live and _live_widgets_available() else slider
    display(make(frames, labels, title=title, width=width))


def _kernel_attached() -> bool:
    """True inside a running Jupyter kernel (JupyterLab, Notebook, VS Code, Colab): there a
    widget has a frontend to talk to. False in plain Python and in terminal IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _live_widgets_available() -> bool:
    """A kernel is attached and ipywidgets imports; else (with a warning when only ipywidgets
    is missing) the caller falls back to the static slider, which works everywhere."""
    if not _kernel_attached():
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        warnings.warn("show_slider(live=True) needs ipywidgets (pip install ipywidgets); "
                      "showing the static slider instead", stacklevel=3)
        return False
    return True


def _to_uint8(frame, i: int, scale: int) -> np.ndarray:
    """One frame as uint8 ``(H, W)`` or ``(H, W, C)``, pixels repeated ``scale`` times."""
    figure = sys.modules.get("matplotlib.figure")  # no figures unless matplotlib is loaded
    if figure is not None and isinstance(frame, figure.Figure):
        buf = io.BytesIO()
        frame.savefig(buf, format="png", dpi=FIGURE_DPI * scale)
        import matplotlib.pyplot as plt
        plt.close(frame)
        return np.asarray(Image.open(buf))
    torch = sys.modules.get("torch")  # likewise, only a loaded torch can make tensors
    if torch is not None and isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu()
        if frame.ndim == 3 and frame.shape[0] in (1, 3):  # (C, H, W) -> (H, W, C)
            frame = frame.permute(1, 2, 0)
        frame = frame.squeeze(-1) if frame.ndim == 3 and frame.shape[-1] == 1 else frame
        # float16/bfloat16 have no numpy twin; integer tensors keep their dtype
        # so that anything but uint8 meets the dtype error below.
        frame = frame.float().numpy() if frame.is_floating_point() else frame.numpy()
    a = np.asarray(frame)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        hint = " (frames must be a sequence of images; wrap a single image in a list)" if a.ndim < 2 else ""
        raise ValueError(f"frame {i} has shape {a.shape}: expected (H, W), (H, W, 3) or (H, W, 4), "
                         f"or a torch tensor (1, H, W) / (3, H, W){hint}")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ValueError(f"frame {i} contains NaN or inf")
        lo, hi = float(a.min()), float(a.max())
        if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
            raise ValueError(f"frame {i} has values in [{lo:.3g}, {hi:.3g}]: float frames must lie "
                             "in [0, 1] (map model images in [-1, 1] with (x + 1) / 2)")
        a = np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise TypeError(f"frame {i} has dtype {a.dtype}: expected float in [0, 1] or uint8")
    if scale > 1:
        a = a.repeat(scale, axis=0).repeat(scale, axis=1)
    return a


def _encode(a: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image, grayscale as 8-bit 'L' (a third of RGB's size)."""
    if a.ndim == 3 and a.shape[-1] == 4 and (a[..., 3] == 255).all():
        a = a[..., :3]  # an opaque alpha channel (every matplotlib figure) is dead weight
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which a PNG always starts with."""
    return struct.unpack(">II", png[16:24])


def _display_width(w: int, width: int | None) -> int:
    if width is None:
        return w * max(1, TARGET_WIDTH // w)
    if isinstance(width, bool) or not isinstance(width, int):
        raise TypeError(f"width must be a positive integer number of CSS pixels, got {width!r}")
    if width < 1:
        raise ValueError(f"width must be a positive integer number of CSS pixels, got {width!r}")
    return width


def _check_title(title) -> None:
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a string or None, got {title!r} ({type(title).__name__})")


def _check_labels(labels, n: int) -> list[str]:
    if isinstance(labels, str):
        raise TypeError("labels must be a sequence of strings, one per frame, not a single string")
    if not hasattr(labels, "__iter__"):
        raise TypeError(f"labels must be a sequence of strings, one per frame, got {type(labels).__name__}")
    labels = [str(label) for label in labels]
    if len(labels) != n:
        raise ValueError(f"got {n} frames but {len(labels)} labels: give exactly one label per frame")
    return labels


def _js(value) -> str:
    """A JSON literal that is safe inside <script>: '<' is escaped, so a label
    containing '</script>' cannot end the script early."""
    return json.dumps(value).replace("<", "\\u003c")
