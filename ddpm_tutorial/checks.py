"""Checks at the door: the clear errors a learner needs, in one place, run once per call.

The functions the chapters display (``diffusion.q_sample``, ``p_sample``, ``loss_simple``, the
U-Net's forward, ``sampling.sample``) are the equations alone. Each is wrapped by :func:`door`,
which checks what a learner passes from a notebook (shapes, dtypes, timesteps in [0, T),
images in [-1, 1], integer counts) and then runs the equation. A door called from inside
another door trusts its arguments: the outer door checked them, or the package built them, so
``loss_simple`` does not check its ``q_sample`` again and a sampling step checks nothing twice.

``inspect.getsource`` of a door (what ``viz.show_source`` displays) is the equation's own
source: the wrapper keeps the function as ``__wrapped__``, and the door is applied after the
``def`` (``q_sample = door(q_sample, ...)``), so no decorator line appears above it.

The bottom floor of the package: it imports torch alone, and every module may import it.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import re
import threading

import torch

RANGE_TOL = 1e-3      # images may overshoot [-1, 1] by float rounding, not more


def check_images(x: torch.Tensor, name: str = "x", *, shape: tuple | None = None,
                 in_range: bool = False, min_count: int = 0) -> None:
    """Raise a clear error unless ``x`` is a floating (B, C, H, W) tensor.

    Optional, for entry points that need more: ``shape`` = the expected (C, H, W);
    ``min_count`` = the fewest images B; ``in_range`` = every value finite and in [-1, 1]
    (up to float rounding: one read-back of two numbers). The one image check of the
    package: math, trainer and metric.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4 or (shape is not None and tuple(x.shape[1:]) != tuple(shape)):
        want = f"(B, {', '.join(map(str, shape))})" if shape is not None else "(B, C, H, W)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor scaled to [-1, 1], got {x.dtype}; "
                        "convert uint8 images with x.float() / 127.5 - 1")
    if len(x) < min_count:
        raise ValueError(f"{name}: need at least {min_count} images, got {len(x)}")
    if in_range and len(x):
        lo, hi = (v.item() for v in torch.aminmax(x.detach()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} contain NaN or inf")
        if lo < -1 - RANGE_TOL or hi > 1 + RANGE_TOL:
            raise ValueError(f"{name} must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                             "clamp them (x.clamp(-1, 1)) or rescale them to [-1, 1]"
                             + (" (uint8 pixels: x / 127.5 - 1)" if hi > 2 else ""))


def check_pair(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Raise unless ``b`` is a tensor of ``a``'s shape (e.g. x_t and the network's output)."""
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"{name_b} must be a torch.Tensor of {name_a}'s shape {tuple(a.shape)}, "
                        f"got {type(b).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def check_timesteps(t: torch.Tensor, T: int, batch: int | None = None) -> None:
    """Raise a clear error unless ``t`` is an integer tensor of shape (B,) in [0, T).

    Called at the doors (the U-Net's forward, ``loss_simple``, ``q_sample``...), never inside
    ``schedules.extract``. The range check reads two numbers back from a CPU tensor; on CUDA
    it is an asynchronous device assert, so the sampling loop never waits for the GPU.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor of integer timesteps, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"t must hold integer timesteps (torch.long), got dtype {t.dtype}")
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"t has {t.shape[0]} timesteps but the batch has {batch} images")
    if not t.numel():
        return
    if t.device.type != "cpu":
        torch._assert_async(((t >= 0) & (t < T)).all(), f"timesteps must lie in [0, {T})")
        return
    lo, hi = (int(v) for v in torch.aminmax(t))
    if lo < 0 or hi >= T:
        raise ValueError(f"timesteps must lie in [0, {T}) (code index = paper t - 1), "
                         f"got min {lo}, max {hi}")


def check_int(value, name: str, minimum: int | None = None) -> int:
    """``value`` as an int: TypeError naming ``name`` for a float, a bool or a string
    (``n=2.5``, ``steps=3.0``), ValueError when it is below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_number(value, name: str) -> float:
    """``value`` as a float: TypeError naming ``name`` unless it is a real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, for display and for the metric."""
    return ((x + 1) / 2).clamp(0, 1)


def load_failure(err: Exception) -> str:
    """torch.load's error in one line. Its own text runs over several lines and advises
    ``weights_only=False``, which would run whatever code a tampered file holds."""
    text = str(err)
    refused = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", text, re.IGNORECASE)
    if refused:
        return (f"it holds a pickled object, {refused.group(1)}, that weights_only=True refuses to load, so nothing "
                "in it ran; do not load it with weights_only=False unless you trust where it came from")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first.split(". ")[0][:160]
    return f"corrupt, truncated, or not written by torch.save: {type(err).__name__}" + (f": {first}" if first else "")


# --- the door ------------------------------------------------------------------------------------

_state = threading.local()       # per thread: how many doors deep the current call is


def inside_door() -> bool:
    """True while a door's function runs (its nested doors then check nothing)."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def trusted():
    """Run a block as if inside a door: the doors it calls trust their arguments."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def door(fn, check=None, *, images: tuple = (), t: str | None = None, data: str | None = None,
         nonempty: bool = False, choices: dict | None = None):
    """``fn`` behind a door: called from outside every door, its arguments are checked first,
    then ``fn`` runs trusted (see the module's docstring). Called from inside a door, ``fn`` runs
    at once. The checks, by argument name:

    images:   the (B, C, H, W) float tensors (:func:`check_images`); every one after the first
              must have the first's shape (:func:`check_pair`); None values are skipped.
    t:        the timesteps, (B,) integers in [0, schedule.T) (:func:`check_timesteps`).
    data:     the one image argument that must be data: finite and in [-1, 1] (images in
              [0, 255] are refused here, not silently noised).
    nonempty: at least one image.
    choices:  {argument: allowed values}.
    check:    a function called with every argument by name, for anything else.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def at_the_door(*args, **kwargs):
        if inside_door():
            return fn(*args, **kwargs)
        if images or t or data or choices or check:
            arguments = signature.bind(*args, **kwargs)
            arguments.apply_defaults()
            _check_arguments(arguments.arguments, images, t, data, nonempty, choices or {})
            if check is not None:
                check(**arguments.arguments)
        with trusted():
            return fn(*args, **kwargs)
    return at_the_door


def _check_arguments(a: dict, images: tuple, t: str | None, data: str | None, nonempty: bool,
                     choices: dict) -> None:
    first = images[0] if images else None
    if first is not None:
        check_images(a[first], first, in_range=first == data, min_count=int(nonempty))
    if t is not None and a[t] is not None:
        check_timesteps(a[t], a["schedule"].T, batch=a[first].shape[0] if first else None)
    for name in images[1:]:
        if a[name] is not None:
            check_pair(a[first], a[name], first, name)
            check_images(a[name], name, in_range=name == data)
    for name, allowed in choices.items():
        if a[name] not in allowed:
            raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, got {a[name]!r}")
