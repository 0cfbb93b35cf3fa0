"""The write-it cells of the sampling chapters: Algorithm 2's loop (chapter 5) and the DDIM step with
eta (chapter 6). Each chapter's own check cell passes with the solution and fails, with a one-line
message naming what differs, when a typical mistake is put into the solution. A tiny network and a
short schedule stand in for the chapter's trained model, so each run takes milliseconds."""
import pytest
import torch

from ddpm_tutorial.config import ModelConfig
from ddpm_tutorial.exercises import Mismatch
from ddpm_tutorial.schedules import make_schedule
from ddpm_tutorial.unet import UNet
from write_it_support import chapter, code_cell, mutate, namespace, next_code_cell, run

SCHEDULE = make_schedule("linear", T=20, beta_start=1e-3, beta_end=0.3)


def chapter_namespace(name: str) -> dict:
    ns = namespace(chapter(name))
    torch.manual_seed(0)
    ns["model"] = UNet(ModelConfig(base_channels=8, channel_mults=(1, 2), groups=4), T=SCHEDULE.T).eval()
    ns["schedule"], ns["device"] = SCHEDULE, torch.device("cpu")
    return ns


@pytest.fixture(scope="module")
def ddpm_loop():
    nb = chapter("05_sampling")
    solution = code_cell(nb, "def my_ddpm_sample(")
    return chapter_namespace("05_sampling"), solution.source, next_code_cell(nb, solution).source


@pytest.fixture(scope="module")
def ddim_step_cells():
    nb = chapter("06_fast_sampling")
    solution = code_cell(nb, "def my_ddim_step(")
    return chapter_namespace("06_fast_sampling"), solution.source, next_code_cell(nb, solution).source


def test_algorithm_2_solution_passes_its_check(ddpm_loop, capsys):
    ns, solution, check = ddpm_loop
    run(solution, ns)
    run(check, ns)
    assert "matches the package" in capsys.readouterr().out


@pytest.mark.parametrize("old, new, says", [
    # noise added at the last step too (line 3)
    ("if t_index > 0 else", "if t_index >= 0 else", "a different number of noises"),
    # the posterior's variance instead of the paper's sigma_t^2 = beta_t
    ("sigma = beta.sqrt()", "sigma = schedule.beta_tilde[t_index].sqrt()", "entries differ"),
    # the sign of the noise term of Eq. 11 flipped
    ("(x - beta / (1 - alpha_bar).sqrt() * eps)", "(x + beta / (1 - alpha_bar).sqrt() * eps)", "entries differ"),
    # the loop stops one step early
    ("range(schedule.T - 1, -1, -1)", "range(schedule.T - 1, 0, -1)", "entries differ"),
    # noise drawn without the generator: not the package's noise
    ("torch.randn(x.shape, generator=generator)", "torch.randn(x.shape)", "drew no noise"),
])
def test_algorithm_2_check_names_a_typical_mistake(ddpm_loop, old, new, says):
    ns, solution, check = ddpm_loop
    run(mutate(solution, old, new), ns)
    with pytest.raises(Mismatch, match=says):
        run(check, ns)


def test_algorithm_2_check_refuses_the_paper_t_as_index(ddpm_loop):
    """t off by one (the paper's t passed where the code's index belongs): the network's own door says so."""
    ns, solution, check = ddpm_loop
    run(mutate(solution, "eps = model(x, t).float()", "eps = model(x, t + 1).float()"), ns)
    with pytest.raises(ValueError, match="code index = paper t - 1"):
        run(check, ns)


def test_ddim_step_solution_passes_its_check(ddim_step_cells, capsys):
    ns, solution, check = ddim_step_cells
    run(solution, ns)
    run(check, ns)
    assert "matches the package" in capsys.readouterr().out


@pytest.mark.parametrize("old, new, says", [
    # sigma without its first factor sqrt((1 - ab_s) / (1 - ab_t))
    ("sigma = eta * ((1 - ab_s) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_s).sqrt()",
     "sigma = eta * (1 - ab_t / ab_s).sqrt()", "eta = 0.5.*eta = 0 agrees"),
    # the direction term keeps all of 1 - ab_s instead of giving sigma^2 to the fresh noise
    ("(1 - ab_s - sigma ** 2).sqrt() * eps", "(1 - ab_s).sqrt() * eps", "eta = 0.5.*eta = 0 agrees"),
    # the eta factor wrong: eta^2 agrees at eta = 0 and 1, not at 1/2
    ("sigma = eta *", "sigma = eta ** 2 *", "eta = 0.5"),
    # hat-x_0 divided by alpha_bar_t instead of its square root: wrong already at eta = 0
    ("/ ab_t.sqrt()", "/ ab_t", "'eta = 0, t"),
])
def test_ddim_step_check_names_a_typical_mistake(ddim_step_cells, old, new, says):
    ns, solution, check = ddim_step_cells
    run(mutate(solution, old, new), ns)
    with pytest.raises(Mismatch, match=says):
        run(check, ns)
