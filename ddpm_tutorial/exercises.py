"""Checks for the chapters' write-it cells: the learner's code against the package's, in one line.

A write-it cell asks the reader to write a piece of the package (``q_sample``, the embedding,
a residual block, ...); the next cell runs both on the same seeded inputs and calls
:func:`check_against`. It prints one line when they agree and raises :class:`Mismatch` (an
``AssertionError``) with one line saying *what* differs when they do not: a missing
``return``, a shape, a NaN, or the entries that differ, how much, and in which rows of the
batch (rows are often timesteps, so "only the rows with t = 999" points at the mistake).
"""
from __future__ import annotations

import torch

__all__ = ["Mismatch", "check_against"]


class Mismatch(AssertionError):
    """The learner's result differs from the package's; the message says where, in one line."""


def _difference(path: str, yours, expected, atol: float, rtol: float) -> str | None:
    """The first difference between ``yours`` and ``expected`` (tensors, numbers, or tuples,
    lists and dicts of them) as one line, or None when they agree."""
    if isinstance(expected, dict):
        if not isinstance(yours, dict):
            return f"{path}: expected a dict with keys {sorted(expected)}, got {type(yours).__name__}"
        if sorted(yours) != sorted(expected):
            return f"{path}: keys {sorted(yours)}, the package's are {sorted(expected)}"
        for key in expected:
            found = _difference(f"{path}[{key!r}]", yours[key], expected[key], atol, rtol)
            if found:
                return found
        return None
    if isinstance(expected, (tuple, list)):
        if not isinstance(yours, (tuple, list)):
            return f"{path}: expected {len(expected)} results, got {type(yours).__name__}"
        if len(yours) != len(expected):
            return f"{path}: {len(yours)} results, the package gives {len(expected)}"
        for i, (a, b) in enumerate(zip(yours, expected)):
            found = _difference(f"{path}[{i}]", a, b, atol, rtol)
            if found:
                return found
        return None
    if yours is None:
        return f"{path}: got None (does your code end with a return?)"
    if not isinstance(expected, torch.Tensor):
        expected = torch.as_tensor(expected)
    if not isinstance(yours, torch.Tensor):
        try:
            yours = torch.as_tensor(yours)
        except (TypeError, ValueError, RuntimeError):
            return f"{path}: expected a tensor of shape {tuple(expected.shape)}, got {type(yours).__name__}"
    if yours.shape != expected.shape:
        return f"{path}: shape {tuple(yours.shape)}, the package's is {tuple(expected.shape)}"
    a = yours.detach().cpu().double()
    b = expected.detach().cpu().double()
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).sum().item()
        return f"{path}: {bad} entries are NaN or inf"
    diff = (a - b).abs()
    wrong = diff > atol + rtol * b.abs()
    if not wrong.any():
        return None
    worst = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape)) if diff.ndim else ()
    line = (f"{path}: {int(wrong.sum())} of {wrong.numel()} entries differ, most at index {list(index)} "
            f"(yours {a.flatten()[worst].item():.4g}, the package's {b.flatten()[worst].item():.4g})")
    if diff.ndim >= 2 and diff.shape[0] > 1:      # which rows of the batch: often one timestep each
        rows = wrong.reshape(diff.shape[0], -1).any(1).nonzero().flatten().tolist()
        line += "; in every row" if len(rows) == diff.shape[0] else f"; only in rows {rows} of {diff.shape[0]}"
    return line


def check_against(what: str, yours, expected, *, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Compare the learner's result with the package's on the same inputs.

    what: names the result in the messages, e.g. ``"my_q_sample(alpha_bar, x0, t, eps)"``.
    yours, expected: tensors (any shape), numbers, or tuples, lists and dicts of them.
    Agreement is ``|yours - expected| <= atol + rtol * |expected|`` entry by entry, as
    ``torch.testing.assert_close`` judges it (float32 rounding passes, a real mistake does not).
    Prints one line when everything agrees; raises :class:`Mismatch` with one line otherwise.
    """
    found = _difference(what, yours, expected, atol, rtol)
    if found:
        raise Mismatch(found)
    largest = _largest_difference(yours, expected)
    print(f"{what}: matches the package (largest difference {largest:.1e})")


def _largest_difference(yours, expected) -> float:
    """The largest absolute difference over every tensor of two structures that agree."""
    if isinstance(expected, dict):
        return max((_largest_difference(yours[k], expected[k]) for k in expected), default=0.0)
    if isinstance(expected, (tuple, list)):
        return max((_largest_difference(a, b) for a, b in zip(yours, expected)), default=0.0)
    a = torch.as_tensor(yours).detach().cpu().double()
    b = torch.as_tensor(expected).detach().cpu().double()
    return (a - b).abs().max().item() if a.numel() else 0.0

