"""Chapter 04's write-it: Algorithm 1 as a plain loop. The chapter's own check cell passes with the
solution as written, and fails, naming what differs, when a typical mistake is put into the loop."""
from __future__ import annotations

import pytest

from ddpm_tutorial.exercises import Mismatch
from write_it_support import chapter, code_cell, mutate, namespace, next_code_cell, run

SOLUTION = "def algorithm1("


@pytest.fixture(scope="module")
def nb():
    return chapter("04_training")


@pytest.fixture(scope="module")
def chapter_ns(nb):
    return namespace(nb)          # the chapter's import cell: schedule, T, x_test, the imports


def check(nb, ns: dict, solution: str) -> None:
    """Define ``algorithm1`` from ``solution`` and run the chapter's check cell on it."""
    ns = dict(ns)
    run(solution, ns)
    run(next_code_cell(nb, code_cell(nb, SOLUTION)).source, ns)


def test_the_solution_passes_the_check(nb, chapter_ns, capsys):
    check(nb, chapter_ns, code_cell(nb, SOLUTION).source)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "matches the package" in out[0], out


MISTAKES = {
    # name: (the correct text, the mistake, what the check must name)
    "t drawn in 1..T": ("t = torch.randint(len(alpha_bar), (batch_size,)",
                        "t = torch.randint(1, len(alpha_bar) + 1, (batch_size,)", "['loss 1']"),
    "x0 as the target": ("(eps - model(xt, t))", "(x0 - model(xt, t))", "['loss 1']"),
    "square roots dropped": ("a.sqrt() * x0 + (1 - a).sqrt() * eps", "a * x0 + (1 - a) * eps", "['loss 1']"),
    "a sum over pixels": ("model(xt, t)).square().mean()", "model(xt, t)).square().sum()", "['loss 1']"),
    "draws in another order": (
        "x0 = data[torch.randint(len(data), (batch_size,), generator=g, device=data.device)]",
        "x0 = data[torch.randint(len(data), (batch_size,), generator=g, device=data.device)]; "
        "_ = torch.randn(1, generator=g, device=data.device)", "['loss 1']"),
    "no zero_grad": ("optimizer.zero_grad()", "pass", "['weights after 2 steps']"),
    "no optimizer step": ("optimizer.step()", "pass", "['loss 2']"),
    "EMA weights swapped": ("p_ema.lerp_(p, 1 - ema_decay)", "p_ema.lerp_(p, ema_decay)", "['EMA after 2 steps']"),
}


@pytest.mark.parametrize("name", MISTAKES)
def test_a_typical_mistake_fails_the_check_and_says_where(nb, chapter_ns, name):
    right, wrong, where = MISTAKES[name]
    broken = mutate(code_cell(nb, SOLUTION).source, right, wrong)
    with pytest.raises(Mismatch) as err:
        check(nb, chapter_ns, broken)
    message = str(err.value)
    assert where in message.split(":")[0], (name, message)
    assert "Hint:" in message and "\n" not in message, message


def test_the_practice_blank_stops_the_check(nb, chapter_ns):
    # what ClearSolutions leaves in the practice notebook: the loop body replaced by a stub
    source = code_cell(nb, SOLUTION).source
    begin, end = source.index("### BEGIN SOLUTION"), source.index("### END SOLUTION") + len("### END SOLUTION")
    indent = source[:begin].rsplit("\n", 1)[1]
    blank = source[:begin] + "# YOUR CODE HERE\n" + indent + "raise NotImplementedError()" + source[end:]
    with pytest.raises(NotImplementedError):
        check(nb, chapter_ns, blank)
