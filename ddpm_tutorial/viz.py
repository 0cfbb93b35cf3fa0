"""Matplotlib figures of the book: image grids, noising strips, schedules, loss curves."""
from __future__ import annotations

import math

import matplotlib
import matplotlib.pyplot as plt
import torch

from .checks import to_unit


def grid_array(images: torch.Tensor, nrow: int | None = None, pad: int = 1):
    """(N, C, H, W) in [-1, 1], C = 1 (grey) or 3 (RGB) -> one array in [0, 1] for imshow:
    (rows*(H+pad) - pad, cols*(W+pad) - pad), and a trailing axis of 3 for RGB; white between
    the images and in empty cells."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1, H, W) or (N, 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = torch.ones(c, rows * (h + pad) - pad, nrow * (w + pad) - pad)
    for i, img in enumerate(to_unit(images.detach().float().cpu())):
        r, col = divmod(i, nrow)
        canvas[:, r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = img
    return (canvas[0] if c == 1 else canvas.permute(1, 2, 0)).numpy()


def show_grid(images: torch.Tensor, nrow: int | None = None, title: str | None = None, ax=None,
              size: float = 0.6):
    """Show (N, 1 or 3, H, W) images in [-1, 1] as a grid; returns the axes."""
    arr = grid_array(images, nrow)
    if ax is None:
        _, ax = plt.subplots(figsize=(size * arr.shape[1] / 28 + 0.2, size * arr.shape[0] / 28 + 0.4))
    ax.imshow(arr, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def glue(name: str, value, display: bool = False):
    """Record ``value`` under ``name`` for the book's prose (myst-nb's ``glue``: the markdown
    writes {glue:text}`name` and shows the number this run computed, never a typed one).
    Where myst-nb is not installed (Colab) nothing is recorded. Returns None, so a cell that
    ends with it does not print the value a second time."""
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return
    myst_glue(name, value, display=display)


def check_image_extension(path) -> None:
    """Raise unless matplotlib can write an image file with ``path``'s extension."""
    from pathlib import Path
    supported = plt.gcf().canvas.get_supported_filetypes()
    plt.close()
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in supported:
        raise ValueError(f"cannot write an image to {path}: unknown extension {'.' + ext if ext else '(none)'}; "
                         f"use one of {', '.join('.' + e for e in sorted(supported))}")


def save_grid(images: torch.Tensor, path, nrow: int | None = None) -> None:
    """Write the grid as a PNG at native pixel size (one image pixel = one PNG pixel)."""
    check_image_extension(path)
    plt.imsave(path, grid_array(images, nrow), cmap="gray", vmin=0, vmax=1)


def show_strip(images: torch.Tensor, labels, title: str | None = None, size: float = 1.1):
    """One row of images with a label under each (e.g. x_t at increasing t)."""
    n = images.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(size * n, size + 0.5))
    for ax, img, label in zip(axes if n > 1 else [axes], to_unit(images.detach().cpu()), labels):
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xlabel(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_schedules(schedules: dict, ax_ab=None, ax_snr=None):
    """alpha_bar_t and log10 SNR_t against t for several named schedules."""
    if ax_ab is None:
        _, (ax_ab, ax_snr) = plt.subplots(1, 2, figsize=(10, 3.2))
    for name, s in schedules.items():
        t = torch.arange(1, s.T + 1)
        ax_ab.plot(t, s.alpha_bar, label=name)
        ax_snr.plot(t, torch.log10(s.snr), label=name)
    ax_ab.set(xlabel="t", ylabel=r"$\bar\alpha_t$", title=r"signal kept: $\bar\alpha_t$")
    ax_snr.set(xlabel="t", ylabel=r"$\log_{10}$ SNR", title=r"SNR $=\bar\alpha_t/(1-\bar\alpha_t)$")
    for ax in (ax_ab, ax_snr):
        ax.grid(alpha=0.3)
        ax.legend()
    return ax_ab, ax_snr


def plot_losses(history, steps_per_epoch: int | None = None, window: int = 50):
    """Loss per step (raw and smoothed) and mean loss per t bucket, side by side."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
    ax1.plot(history.loss, alpha=0.25, lw=0.8, label="per step")
    ax1.plot(history.smoothed(window), lw=1.5, label=f"mean of last {window}")
    if steps_per_epoch and len(history.loss) >= steps_per_epoch:
        means = history.epoch_means(steps_per_epoch)
        ax1.plot([(i + 1) * steps_per_epoch for i in range(len(means))], means, "o-", label="per epoch")
    ax1.set(xlabel="step", ylabel=r"$L_\mathrm{simple}$", yscale="log", title="training loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    buckets = history.bucket_means()
    K = len(buckets)
    ax2.bar(range(K), buckets, color=matplotlib.colormaps["viridis"](torch.linspace(0, 1, K).numpy()))
    ax2.set_xticks(range(K), [f"{int(i * 100 / K)}-{int((i + 1) * 100 / K)}%" for i in range(K)],
                   rotation=45, fontsize=8)
    ax2.set(xlabel="t as % of T", ylabel="mean loss", title="loss per t bucket (whole run)")
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def show_source(obj) -> None:
    """Display the real source of a package function or class in a notebook (it cannot drift)."""
    import inspect
    from IPython.display import Markdown, display
    display(Markdown(f"```python\n{inspect.getsource(obj).rstrip()}\n```"))


def show_chains(forward: list, reverse: list, labels: list, size: float = 0.9):
    """The two chains of Ho et al. (Fig. 2) drawn with images: columns x_T ... x_0 from left to
    right, labelled by ``labels``; the top rows are the forward chain q (it runs from right to
    left: x_0 is noised into x_T), the bottom rows the reverse chain p_theta (left to right: x_T
    is denoised into x_0). ``forward`` and ``reverse``: one (N, C, H, W) tensor in [-1, 1] per
    column, N images each. Returns the figure."""
    if not (len(forward) == len(reverse) == len(labels)):
        raise ValueError(f"one forward and one reverse frame per label: got {len(forward)}, {len(reverse)}, "
                         f"{len(labels)}")
    n, k = forward[0].shape[0], len(labels)
    fig = plt.figure(figsize=(size * k + 0.6, 2 * (size * n + 0.55)), layout="constrained")
    titles = (r"$\longleftarrow$ forward chain $q(x_t \mid x_{t-1})$: adds noise",
              r"reverse chain $p_\theta(x_{t-1} \mid x_t)$: removes it $\longrightarrow$")
    for sub, chain, title in zip(fig.subfigures(2, 1), (forward, reverse), titles):
        sub.suptitle(title, fontsize=10)
        axes = sub.subplots(n, k, squeeze=False)
        for i in range(n):
            for col in range(k):
                ax = axes[i, col]
                ax.imshow(to_unit(chain[col][i].detach().cpu())[0], cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(labels[col], fontsize=9)
    return fig
