"""The write-it cells of chapters 01-03: each chapter's own check cell passes with the chapter's
solution and fails, with a one-line message, when one typical mistake is put into it.

The mistakes are made by editing the solution's text (tests/write_it_support.mutate), so a
rewritten solution makes its test fail loudly rather than test nothing. Cells run in this
process, in quick mode: milliseconds each, plus one checkpoint load for chapter 03.
"""
from __future__ import annotations

import pytest

from ddpm_tutorial.exercises import Mismatch
from write_it_support import chapter, code_cell, mutate, namespace, next_code_cell, run

# (chapter, text that finds the solution cell, {mistake: (text in the solution, what a learner writes instead)})
WRITE_IT = {
    "q_step": ("01_forward_process", "def my_q_step(", {
        "sqrt of beta dropped": ("+ b.sqrt() * eps", "+ b * eps"),
        "no shrinking (exercise 1.2)": ("(1 - b).sqrt() * x_prev", "x_prev"),
        "shrinking by 1 - beta, not its square root": ("(1 - b).sqrt() * x_prev", "(1 - b) * x_prev"),
        "beta of the next step (off by one)": ("beta[t]", "beta[(t + 1).clamp(max=len(beta) - 1)]"),
    }),
    "q_sample": ("01_forward_process", "def my_q_sample(", {
        "square roots dropped": ("ab.sqrt() * x0 + (1 - ab).sqrt() * eps", "ab * x0 + (1 - ab) * eps"),
        "1 - sqrt(alpha_bar) for the noise": ("(1 - ab).sqrt() * eps", "(1 - ab.sqrt()) * eps"),
        "alpha_bar of the step before (off by one)": ("alpha_bar[t]", "alpha_bar[t - 1]"),
        "alpha of one step instead of alpha_bar": ("alpha_bar[t]", "(1 - schedule.beta)[t]"),
    }),
    "embedding": ("02_time_embeddings", "def my_sinusoidal_embedding(", {
        "sin and cos swapped": ("[angles.sin(), angles.cos()]", "[angles.cos(), angles.sin()]"),
        "sin and cos interleaved": ("torch.cat([angles.sin(), angles.cos()], dim=1)",
                                    "torch.stack([angles.sin(), angles.cos()], dim=2).flatten(1)"),
        "odd size not padded": ("F.pad(emb, (0, d % 2))", "emb"),
        "zero column first": ("F.pad(emb, (0, d % 2))", "F.pad(emb, (d % 2, 0))"),
        "released code's frequencies i / (h - 1)": ("/ h)", "/ max(h - 1, 1))"),
    }),
    "resblock": ("03_unet", "class MyResBlock(", {
        "time added after the second conv instead of before it": (
            "h = h + self.time_proj(F.silu(temb))[:, :, None, None]   # (B, c_out, 1, 1): the same shift at every pixel\n"
            "        h = self.conv2(F.silu(self.norm2(h)))",
            "h = self.conv2(F.silu(self.norm2(h)))\n        h = h + self.time_proj(F.silu(temb))[:, :, None, None]"),
        "no SiLU on the time embedding": ("self.time_proj(F.silu(temb))", "self.time_proj(temb)"),
        "shortcut forgotten": ("return h + self.residual(x)", "return h"),
        "SiLU before the norm": ("F.silu(self.norm1(x))", "self.norm1(F.silu(x))"),
    }),
    "unet": ("03_unet", "class MyUNet(", {
        "skip saved after downsampling": (
            "skips.append(h)                     # saved BEFORE downsampling: (B, w_i, r_i, r_i)\n"
            "                h = self.downsamples[i](h)",
            "h = self.downsamples[i](h)\n                skips.append(h)"),
        "skips used first-in first-out": ("skips.pop()", "skips.pop(0)"),
        "upsampled without the upsampling conv": ("upsample(h, skip.shape[2:])",
                                                  "F.interpolate(h, size=skip.shape[2:], mode=\"nearest\")"),
        "skip concatenated before the upsampled features": ("torch.cat([upsample(h, skip.shape[2:]), skip], dim=1)",
                                                            "torch.cat([skip, upsample(h, skip.shape[2:])], dim=1)"),
        "output head without norm and SiLU": ("self.conv_out(F.silu(self.norm_out(h)))", "self.conv_out(h)"),
    }),
}
CASES = [(name, mistake) for name, (_, _, mistakes) in WRITE_IT.items() for mistake in mistakes]


@pytest.fixture(scope="module")
def chapters():
    """Each chapter's notebook and the namespace its import cell leaves, once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            nb = chapter(name)
            ns = namespace(nb)
            if name == "01_forward_process":    # the checks read the schedule the chapter makes
                run(code_cell(nb, 'schedule = schedules.make_schedule("linear"').source, ns)
            if name == "03_unet":               # the check loads a trained network into the learner's module
                from ddpm_tutorial.checkpoint import model_from_checkpoint, shipped_checkpoint_path
                ns["trained"] = model_from_checkpoint(shipped_checkpoint_path())[0]
            cache[name] = (nb, ns)
        return cache[name]
    return get


def solution_and_check(chapters, name):
    nb_name, marker, _ = WRITE_IT[name]
    nb, ns = chapters(nb_name)
    solution = code_cell(nb, marker)
    return solution.source, next_code_cell(nb, solution).source, dict(ns)


@pytest.mark.parametrize("name", WRITE_IT)
def test_check_passes_with_the_chapters_solution(chapters, name, capsys):
    solution, check, ns = solution_and_check(chapters, name)
    assert "### BEGIN SOLUTION" in solution and "check_against(" in check
    run(solution, ns)
    run(check, ns)
    assert "matches the package" in capsys.readouterr().out


@pytest.mark.parametrize("name,mistake", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_check_fails_on_a_typical_mistake(chapters, name, mistake):
    solution, check, ns = solution_and_check(chapters, name)
    old, new = WRITE_IT[name][2][mistake]
    run(mutate(solution, old, new), ns)
    with pytest.raises(Mismatch) as info:
        run(check, ns)
    message = str(info.value)
    assert "\n" not in message and ("differ" in message or "shape" in message or "NaN" in message), message


def test_every_write_it_cell_of_chapters_01_to_03_is_tested():
    """A new write-it cell in these chapters gets its mistakes listed here."""
    found = set()
    for nb_name in ("01_forward_process", "02_time_embeddings", "03_unet"):
        nb = chapter(nb_name)
        found |= {(nb_name, line.strip().split("(")[0]) for c in nb.cells if c.cell_type == "code"
                  and "### BEGIN SOLUTION" in c.source and "check_against(" in next_code_cell(nb, c).source
                  for line in c.source.splitlines() if line.startswith(("def my_", "class My"))}
    listed = {(nb_name, marker.rstrip("(")) for nb_name, marker, _ in WRITE_IT.values()}
    assert found == listed, f"write-it cells without listed mistakes: {found - listed}; listed but gone: {listed - found}"
