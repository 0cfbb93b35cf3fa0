"""Class-conditional models and classifier-free guidance (Ho & Salimans 2022, Eq. 6):

    tilde-eps = (1 + w) eps_theta(x_t, t, c) - w eps_theta(x_t, t, null)

the formula and its one batched network call, label dropout in training, unconditional models and the shipped
checkpoint unchanged, errors (library and CLI), and a conditional model that learns to separate two classes."""
import dataclasses

import pytest
import torch

import ddpm_tutorial.data as data
from conftest import random_images
from ddpm_tutorial.__main__ import main
from ddpm_tutorial.checkpoint import load_checkpoint, model_from_checkpoint, shipped_checkpoint_path
from ddpm_tutorial.config import ModelConfig, TrainConfig
from ddpm_tutorial.diffusion import predict_x0_from_eps
from ddpm_tutorial.sampling import ddim_sample, ddim_step, ddim_timesteps, ddpm_sample, guided_eps, sample
from ddpm_tutorial.schedules import NoiseSchedule, make_schedule
from ddpm_tutorial.train import batch_indices, build_trainer
from ddpm_tutorial.unet import UNet

needs_data = pytest.mark.skipif(
    not all((data.DEBIAN_DIR / f"{n}.gz").exists() for n in data.IDX_FILES),
    reason=f"Debian package dataset-fashion-mnist not installed ({data.DEBIAN_DIR} missing)")

K = 3    # classes of the tiny conditional model; index K is the null class


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is fastest and keeps the numbers independent of the machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cond(tiny_config):
    """A tiny class-conditional U-Net (8x8 images, K classes), seeded, in eval mode."""
    torch.manual_seed(0)
    model = UNet(dataclasses.replace(tiny_config, num_classes=K), T=100).eval()
    with torch.no_grad():        # the embedding starts at N(0, 1); make the classes clearly different
        model.class_embed.weight.mul_(3)
    return model


@pytest.fixture
def batch(cond):
    """x_t (6, 1, 8, 8), t (6,), y (6,) with every class."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 30, 50, 80, 99])
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return x, t, y


# --- the formula ------------------------------------------------------------------------------------------

@torch.no_grad()
def test_w0_is_the_conditional_prediction(cond, batch):
    x, t, y = batch
    assert torch.equal(guided_eps(cond, x, t, y, 0.0), cond(x, t, y))


@torch.no_grad()
def test_no_label_is_the_null_class(cond, batch):
    x, t, _ = batch
    null = torch.full((len(x),), K)
    assert torch.equal(cond(x, t), cond(x, t, null))
    assert torch.equal(guided_eps(cond, x, t, None, 0.0), cond(x, t, null))
    assert not torch.allclose(cond(x, t, torch.zeros(len(x), dtype=torch.long)), cond(x, t, null))


@torch.no_grad()
@pytest.mark.parametrize("w", [0.5, 1.0, 3.0, 7.5])
def test_batched_call_equals_two_separate_calls(cond, batch, w):
    x, t, y = batch
    eps_c, eps_u = cond(x, t, y), cond(x, t, torch.full_like(y, K))     # two calls of B images
    calls = []
    hook = cond.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        guided = guided_eps(cond, x, t, y, w)
    finally:
        hook.remove()
    assert calls == [2 * len(x)]                                       # one call of 2B images
    torch.testing.assert_close(guided, (1 + w) * eps_c - w * eps_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided, eps_c + w * (eps_c - eps_u), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_w_minus_1_is_the_unconditional_prediction(cond, batch):
    x, t, y = batch
    torch.testing.assert_close(guided_eps(cond, x, t, y, -1.0), cond(x, t), rtol=1e-5, atol=1e-5)


class Guided(torch.nn.Module):
    """An unconditional model whose eps(x_t, t) is ``model``'s guided prediction for one class:
    sampling it without a label must equal sampling ``model`` with that label and w."""

    def __init__(self, model, y: int, w: float):
        super().__init__()
        self.model, self.y, self.w = model, y, w
        self.config = dataclasses.replace(model.config, num_classes=0)

    def forward(self, x, t):
        return guided_eps(self.model, x, t, torch.full((len(x),), self.y), self.w)


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpm++2m"])
def test_every_sampler_steps_with_the_guided_prediction(cond, method):
    schedule = make_schedule("linear", T=100)
    run = (lambda m, **kw: ddpm_sample(m, schedule, n=3, seed=4, progress=False, **kw)) if method == "ddpm" else \
          (lambda m, **kw: sample(m, schedule, method, n=3, steps=10, seed=4, progress=False, **kw))
    got = run(cond, y=2, guidance=1.5).images
    torch.testing.assert_close(got, run(Guided(cond, 2, 1.5)).images, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, run(cond, y=0, guidance=1.5).images)     # the class changes the samples


def test_a_label_per_sample(cond):
    schedule = make_schedule("linear", T=100)
    y = torch.tensor([0, 2, 1])
    mixed = ddim_sample(cond, schedule, n=3, steps=5, seed=0, y=y, guidance=2.0, progress=False).images
    for i, c in enumerate(y.tolist()):
        alone = ddim_sample(cond, schedule, n=3, steps=5, seed=0, y=c, guidance=2.0, progress=False).images
        torch.testing.assert_close(mixed[i], alone[i], rtol=1e-5, atol=1e-5)


# --- label dropout ----------------------------------------------------------------------------------------

def conditional_trainer(make_preset, tiny_config, p_uncond: float, seed: int = 0, n: int = 64):
    images = random_images(n)
    labels = torch.arange(n) % K
    preset = make_preset(model=dataclasses.replace(tiny_config, num_classes=K), batch_size=n,
                         p_uncond=p_uncond, seed=seed)
    return build_trainer(preset, images, device="cpu", labels=labels), labels


def drawn_labels(trainer, step: int) -> torch.Tensor:
    trainer.step = step
    return trainer.draw_batch()[3]


def test_label_dropout_rate_is_p_uncond(make_preset, tiny_config):
    p = 0.3
    trainer, labels = conditional_trainer(make_preset, tiny_config, p)
    steps, dropped, total = 300, 0, 0
    for step in range(steps):
        y = drawn_labels(trainer, step)
        kept = y != K
        idx = batch_indices(len(labels), trainer.cfg.batch_size, trainer.cfg.seed, step)
        assert torch.equal(y[kept], labels[idx][kept])                # a kept label is the image's own
        dropped, total = dropped + int((~kept).sum()), total + len(y)
    sd = (p * (1 - p) / total) ** 0.5                                  # binomial standard deviation of the rate
    assert abs(dropped / total - p) < 5 * sd, f"dropped {dropped / total:.4f} of {total} labels, p_uncond = {p}"


def test_label_dropout_is_deterministic_per_seed_and_step(make_preset, tiny_config):
    a, _ = conditional_trainer(make_preset, tiny_config, 0.5, seed=3)
    b, _ = conditional_trainer(make_preset, tiny_config, 0.5, seed=3)
    c, _ = conditional_trainer(make_preset, tiny_config, 0.5, seed=4)
    assert torch.equal(drawn_labels(a, 7), drawn_labels(b, 7))
    assert torch.equal(drawn_labels(a, 7), drawn_labels(a, 7))            # drawing again changes nothing
    assert not torch.equal(drawn_labels(a, 7) == K, drawn_labels(a, 8) == K)
    assert not torch.equal(drawn_labels(a, 7) == K, drawn_labels(c, 7) == K)


def test_no_dropout_never_draws_the_null_class(make_preset, tiny_config):
    trainer, _ = conditional_trainer(make_preset, tiny_config, 0.0)
    assert all((drawn_labels(trainer, s) != K).all() for s in range(50))


def test_unconditional_trainer_draws_no_labels(make_preset, tiny_config, tiny_images):
    trainer = build_trainer(make_preset(model=tiny_config), tiny_images(), device="cpu")
    assert trainer.draw_batch()[3] is None


def test_labels_are_checked(make_preset, tiny_config, tiny_images):
    images = tiny_images(n=16)
    cond_preset = make_preset(model=dataclasses.replace(tiny_config, num_classes=K))
    with pytest.raises(ValueError, match="needs the labels of its data"):
        build_trainer(cond_preset, images, device="cpu", labels=None)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        build_trainer(cond_preset, images, device="cpu", labels=torch.full((16,), K))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(16,\)"):
        build_trainer(cond_preset, images, device="cpu", labels=torch.zeros(8, dtype=torch.long))
    from ddpm_tutorial.train import Trainer
    with pytest.raises(ValueError, match="model has no class embedding"):
        Trainer(UNet(tiny_config, T=100), images, make_preset().train, make_preset().diffusion, "cpu",
                labels=torch.zeros(16, dtype=torch.long))


# --- unconditional models keep working unchanged --------------------------------------------------------

def test_the_option_leaves_the_unconditional_initialisation_alone(tiny_config):
    torch.manual_seed(5)
    plain = UNet(tiny_config).state_dict()
    torch.manual_seed(5)
    conditional = UNet(dataclasses.replace(tiny_config, num_classes=10)).state_dict()
    assert set(conditional) - set(plain) == {"class_embed.weight"}
    assert conditional["class_embed.weight"].shape == (11, tiny_config.temb_dim)     # 10 classes + null
    assert all(torch.equal(plain[k], conditional[k]) for k in plain)


def test_shipped_checkpoint_is_unconditional_and_samples_as_before():
    ckpt = load_checkpoint(shipped_checkpoint_path())
    assert not any(k.startswith("class_embed") for k in ckpt["ema"])
    model, schedule, _ = model_from_checkpoint(ckpt)
    assert model.config.num_classes == 0 and model.class_embed is None
    default = ddim_sample(model, schedule, n=2, steps=4, seed=0, progress=False).images
    explicit = ddim_sample(model, schedule, n=2, steps=4, seed=0, y=None, guidance=0.0, progress=False).images
    assert torch.equal(default, explicit)
    # the same chain by hand, calling the network as the first edition did: model(x_t, t), no label
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    taus = ddim_timesteps(schedule.T, 4)
    with torch.no_grad():
        for i, t_index in enumerate(taus):
            t = torch.full((2,), t_index)
            eps = model(x, t)
            x = ddim_step(schedule, x, eps, predict_x0_from_eps(schedule, x, t, eps), t_index,
                          taus[i + 1] if i + 1 < len(taus) else None, 0.0, None)
    torch.testing.assert_close(default, x.clamp(-1, 1), rtol=0, atol=0)


def test_a_first_edition_checkpoint_without_num_classes_loads():
    ckpt = load_checkpoint(shipped_checkpoint_path())
    ckpt["config"]["model"].pop("num_classes", None)
    model, _, _ = model_from_checkpoint(ckpt)
    assert model.config.num_classes == 0


# --- errors -------------------------------------------------------------------------------------------------

def test_bad_class_requests_are_refused(cond, tiny_config):
    schedule = make_schedule("linear", T=100)
    run = lambda m, **kw: ddim_sample(m, schedule, n=2, steps=2, progress=False, **kw)   # noqa: E731
    for y in (K, -1, [0, K]):                    # K is the null class: not something to ask for
        with pytest.raises(ValueError, match=r"y must be one class index in \[0, 3\)"):
            run(cond, y=torch.tensor(y) if isinstance(y, list) else y)
    with pytest.raises(ValueError, match=r"y must be one class index in \[0, 3\) or 2 of them"):
        run(cond, y=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="guidance needs a class"):
        run(cond, guidance=2.0)
    for w in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance scale w must be a finite number >= 0"):
            run(cond, y=0, guidance=w)
    uncond = UNet(tiny_config, T=100).eval()
    with pytest.raises(ValueError, match="no class embedding"):
        run(uncond, y=0)
    with pytest.raises(ValueError, match="guidance needs a class"):
        run(uncond, guidance=1.0)
    x, t = torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="no class embedding"):
        uncond(x, t, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\]"):
        cond(x, t, torch.tensor([0, K + 1]))
    with pytest.raises(ValueError, match=r"y must be an integer tensor of shape \(2,\)"):
        cond(x, t, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("argv, message", [
    (f"--class robot --checkpoint {shipped_checkpoint_path('ddpm_fashion_cpu_cond.pt')}",     # names: Fashion-MNIST's
     "error: unknown class 'robot'; expected an index 0-9 or one of: t-shirt/top, trouser"),
    ("--class sneaker", "error: this checkpoint has no class embedding (an unconditional model)"),
    ("--class 7 --guidance 2", "error: this checkpoint has no class embedding (an unconditional model)"),
    ("--guidance 2", "error: --guidance needs --class"),
    ("--class bag --guidance -1", "error: --guidance must be a finite number >= 0, got -1.0"),
])
def test_cli_class_errors_on_the_shipped_checkpoint(tmp_path, capsys, argv, message):
    png = tmp_path / "x.png"
    code = main(["sample", "--n", "1", "--ddim-steps", "2", "--png", str(png), *argv.split()])
    out, err = capsys.readouterr()
    assert code == 1, err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out and not png.exists()


@pytest.mark.slow
@needs_data
def test_cli_trains_and_samples_a_conditional_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DDPM_DATA_DIR", raising=False)
    ck, png = tmp_path / "cond.pt", tmp_path / "sneakers.png"
    assert main(["train", "--preset", "quick", "--conditional", "--steps", "2", "--subset", "64",
                 "--out", str(ck)]) == 0
    assert load_checkpoint(ck)["config"]["model"]["num_classes"] == 10
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(ck), "--class", "Sneaker", "--guidance", "2", "--n", "2",
                 "--ddim-steps", "2", "--png", str(png)]) == 0
    assert png.exists()
    assert main(["sample", "--checkpoint", str(ck), "--class", "10", "--n", "1", "--ddim-steps", "2",
                 "--png", str(png)]) == 1
    assert "unknown class '10'" in capsys.readouterr().err


# --- it learns ----------------------------------------------------------------------------------------------

TROUSER, BAG = data.CLASSES.index("Trouser"), data.CLASSES.index("Bag")


@pytest.mark.slow
@needs_data
def test_a_conditional_model_learns_to_separate_two_classes():
    """64 trousers and 64 bags, a small network, 300 steps (about 40 s on one thread), 16 guided samples asked
    for each class. The book's classifier scores each sample by how much more trouser than bag it looks (logit
    trouser - logit bag); a sample asked to be a trouser must outscore one asked to be a bag in almost every pair.

    Why pairs and not the classifier's argmax: after a few hundred steps the samples have the right shapes but a grey,
    grainy background that real Fashion-MNIST never has, and on such images the classifier's argmax says "bag" for
    most of them whatever they show (in development: 6-56% of the trousers). That offset is the same for both sets, so
    it cannot change which of two samples looks more like a trouser. A model that ignored its label would give both
    sets one distribution and score 0.5; guidance with the wrong sign would score below 0.5. In development seeds 1-3
    scored 1.00 (every pair right), and the same recipe with shuffled labels 0.42."""
    from ddpm_tutorial.config import get_preset
    from ddpm_tutorial.metrics import classifier_features
    x, y = data.load_fashion_mnist(train=True)
    idx = torch.cat([torch.nonzero(y == c)[:64, 0] for c in (TROUSER, BAG)])
    preset = dataclasses.replace(
        get_preset("quick"), model=ModelConfig(base_channels=16, channel_mults=(1, 2), num_classes=10),
        train=TrainConfig(steps=300, batch_size=32, lr=2e-3, warmup_steps=10, ema_decay=0.9, seed=1))
    trainer = build_trainer(preset, x[idx], device="cpu", labels=y[idx])
    trainer.fit(progress=False)
    model, schedule = trainer.ema.module.eval(), NoiseSchedule.from_config(preset.diffusion)
    margin = {}
    for c in (TROUSER, BAG):
        images = ddim_sample(model, schedule, n=16, steps=20, y=c, guidance=3.0, seed=0, clip_x0=True,
                             progress=False).images
        logits = classifier_features(images)[1]                             # (16, 10)
        margin[c] = logits[:, TROUSER] - logits[:, BAG]                     # (16,): how trouser-like
    pairs_right = (margin[TROUSER][:, None] > margin[BAG][None, :]).float().mean().item()
    assert pairs_right >= 0.9, (f"a trouser sample outscored a bag sample in only {pairs_right:.2f} of the "
                                f"16 x 16 pairs (0.5: the label is ignored)")
