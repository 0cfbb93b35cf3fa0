"""The write-it cells of chapters 07 (Welch's standard error and degrees of freedom) and 08 (the guided
prediction): each chapter's own check cell passes with the chapter's solution and fails, with a one-line
message, when one typical mistake is put into it (tests/write_it_support.mutate edits the solution's text)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ddpm_tutorial.config import ModelConfig, get_preset
from ddpm_tutorial.exercises import Mismatch
from ddpm_tutorial.unet import UNet
from write_it_support import chapter, code_cell, mutate, namespace, next_code_cell, run

WELCH = {
    "variances not divided by the seed counts": ("va, vb = sa ** 2 / na, sb ** 2 / nb", "va, vb = sa ** 2, sb ** 2"),
    "standard deviations added, not variances": ("se = math.sqrt(va + vb)", "se = math.sqrt(va) + math.sqrt(vb)"),
    "pooled degrees of freedom n_a + n_b - 2": (
        "df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))", "df = na + nb - 2"),
}
GUIDED = {
    "w and 1 + w swapped": ("(1 + w) * model(x, t, y) - w * model(x, t, null)",
                            "w * model(x, t, y) - (1 + w) * model(x, t, null)"),
    "guided away from the conditional branch": ("(1 + w) * model(x, t, y) - w * model(x, t, null)",
                                                "(1 + w) * model(x, t, null) - w * model(x, t, y)"),
    "class 0 taken for the null class": ("torch.full_like(y, model.config.num_classes)", "torch.zeros_like(y)"),
}


def ablation_namespace():
    """Chapter 07's write-it needs the table's rows: two variants of three seeds, as ablation.summarize gives."""
    nb = chapter("07_skip_connection_ablation")
    ns = namespace(nb)
    rows = [{"variant": "pre", "fd": 196.6, "fd_std": 13.3, "seeds": 3},
            {"variant": "post", "fd": 312.2, "fd_std": 23.1, "seeds": 3}]
    ns.update(rows=rows, by={r["variant"]: r for r in rows})
    return nb, ns


def guidance_namespace():
    """Chapter 08's write-it needs a class-conditional network: a tiny one, random weights, 10 classes + null."""
    nb = chapter("08_guidance")
    ns = namespace(nb)
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("quick").model, base_channels=8, channel_mults=(1, 2), num_classes=10)
    model = UNet(cfg).eval()
    with torch.no_grad():          # a non-zero class embedding, so a wrong class changes the output
        model.class_embed.weight.normal_()
    ns.update(model=model, device=torch.device("cpu"), preset=get_preset("quick"))
    return nb, ns


@pytest.mark.parametrize("setup, marker, mistakes", [
    (ablation_namespace, "def my_welch(", WELCH), (guidance_namespace, "def my_guided_output(", GUIDED)],
    ids=["welch", "guided"])
def test_solution_passes(setup, marker, mistakes):
    nb, ns = setup()
    solution = code_cell(nb, marker)
    run(solution.source, ns)
    run(next_code_cell(nb, solution).source, ns)


@pytest.mark.parametrize("setup, marker, mistake, change", [
    *[(ablation_namespace, "def my_welch(", m, c) for m, c in WELCH.items()],
    *[(guidance_namespace, "def my_guided_output(", m, c) for m, c in GUIDED.items()]],
    ids=[*WELCH, *GUIDED])
def test_typical_mistake_fails(setup, marker, mistake, change):
    nb, ns = setup()
    solution = code_cell(nb, marker)
    run(mutate(solution.source, *change), ns)
    with pytest.raises(Mismatch) as err:
        run(next_code_cell(nb, solution).source, ns)
    assert "\n" not in str(err.value).strip()          # one line that says what differs
