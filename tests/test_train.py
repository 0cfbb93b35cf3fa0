"""Training: learning works (overfit one batch), train_step is Algorithm 1 and the previous
implementation's arithmetic, the loop's bookkeeping, EMA, lr schedule, Ctrl-C, data checks."""
import copy
import dataclasses
import math
import types

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import ddpm_tutorial.train as train_module
from ddpm_tutorial.checkpoint import load_checkpoint
from ddpm_tutorial.config import ModelConfig
from ddpm_tutorial.diffusion import loss_simple
from ddpm_tutorial.schedules import linear_betas, make_schedule
from ddpm_tutorial.train import (History, Trainer, batch_indices, build_trainer, check_training_data, lr_factor,
                                 step_generator)
from ddpm_tutorial.unet import UNet


@pytest.fixture
def make_trainer(make_preset, tiny_images):
    """``make_trainer(data=None, **train_fields)``: build_trainer on a tiny preset (T = 100), CPU."""
    def make(data=None, **train):
        return build_trainer(make_preset(**train), tiny_images() if data is None else data, device="cpu")
    return make


def test_overfit_one_batch():
    """Algorithm 1 on one fixed batch (fixed x_0, t, eps): L_simple must fall well below its start."""
    torch.manual_seed(0)
    model = UNet(ModelConfig(base_channels=16, channel_mults=(1, 2), groups=8))
    schedule = make_schedule("linear")
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    x0 = torch.stack([((xx - 0.1 * i) ** 2 + (yy + 0.05 * i) ** 2 < 0.25 + 0.02 * i).float() * 2 - 1
                      for i in range(8)])[:, None]                        # (8, 1, 28, 28) discs
    t = torch.linspace(0, 999, 8).long()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        loss = loss_simple(model, schedule, x0, t, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < 0.3 * losses[0]:
            break
    assert losses[0] > 0.5                     # an untrained network is far from eps
    assert losses[-1] < 0.3 * losses[0], f"L_simple only fell from {losses[0]:.3f} to {losses[-1]:.3f}"


# --- build_trainer ------------------------------------------------------------------------------

def test_build_trainer_seeds_the_initialisation(make_preset, tiny_images):
    data = tiny_images()
    torch.manual_seed(123)
    a = build_trainer(make_preset(seed=4), data, device="cpu")
    torch.manual_seed(456)                                   # the global seed does not matter
    b = build_trainer(make_preset(seed=4), data, device="cpu")
    c = build_trainer(make_preset(seed=5), data, device="cpu")
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(wa, wb), name
    assert not torch.equal(a.model.conv_in.weight, c.model.conv_in.weight)
    # the initialisation is torch's default init under manual_seed(train.seed)
    torch.manual_seed(4)
    reference = UNet(a.model.config, T=100)
    assert all(torch.equal(x, y) for x, y in zip(reference.state_dict().values(), a.model.state_dict().values()))


def test_build_trainer_leaves_the_global_rng_alone(make_preset, tiny_images):
    data = tiny_images()
    torch.manual_seed(99)
    state = torch.get_rng_state()
    build_trainer(make_preset(seed=4), data, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)


def test_build_trainer_uses_the_presets_configs(make_preset, tiny_images):
    preset = make_preset(steps=3)
    trainer = build_trainer(preset, tiny_images(), device="cpu")
    assert trainer.model.config == preset.model and trainer.cfg == preset.train
    assert trainer.diffusion_cfg == preset.diffusion and trainer.schedule.T == 100 and trainer.model.T == 100
    # model= / train= replace them (the ablation's variants)
    post = dataclasses.replace(preset.model, skip="post")
    other = build_trainer(preset, tiny_images(), device="cpu", model=post,
                          train=dataclasses.replace(preset.train, seed=9, steps=2))
    assert other.model.config == post and other.cfg.seed == 9 and other.cfg.steps == 2
    assert trainer.device == torch.device("cpu")


# --- train_step is Algorithm 1 -------------------------------------------------------------------

def test_train_step_is_algorithm_1_by_hand(make_trainer):
    """Lines 2-5 of Algorithm 1 written out: the batch, t and eps from the (seed, step) generators,
    x_t by Eq. 4 with a float64 schedule, L_simple = mean ||eps - eps_theta(x_t, t)||^2."""
    trainer = make_trainer(seed=3, batch_size=8)
    before = copy.deepcopy(trainer.model)
    data, T = trainer.data, 100

    g = torch.Generator().manual_seed(3 * 1_000_003 + 0)                        # step 0 of seed 3
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(3 * 7919 + 0))
    x0 = data[order[:8]]                                                         # line 2
    t = torch.randint(0, T, (8,), generator=g)                                   # line 3
    eps = torch.randn(x0.shape, generator=g)                                     # line 4
    alpha_bar = torch.cumprod(1 - linear_betas(T), 0)[t].reshape(-1, 1, 1, 1)
    xt = (alpha_bar.sqrt() * x0.double() + (1 - alpha_bar).sqrt() * eps.double()).float()
    with torch.no_grad():
        expected = (eps - before.train()(xt, t)).pow(2).mean().item()           # line 5's loss

    loss = trainer.train_step().item()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert trainer.history.loss == [loss] and trainer.step == 1
    assert not torch.equal(before.conv_in.weight, trainer.model.conv_in.weight)  # a gradient step was taken


def test_draw_batch_is_seeded_by_seed_and_step(make_trainer):
    trainer = make_trainer(seed=2)
    x0, t, eps, y = trainer.draw_batch()
    again = trainer.draw_batch()
    assert all(torch.equal(a, b) for a, b in zip((x0, t, eps), again[:3]))    # a function of (seed, step)
    assert y is None and again[3] is None                                      # an unconditional model
    assert x0.shape == (8, 1, 8, 8) and t.shape == (8,) and t.dtype == torch.long and eps.shape == x0.shape
    assert 0 <= t.min() and t.max() < 100
    trainer.step = 1
    assert not torch.equal(trainer.draw_batch()[1], t)


def _previous_implementation_steps(model, data, cfg, schedule, steps):
    """The first edition's Trainer.train_step on the CPU (fp32, no autocast, GradScaler disabled),
    copied from git history (5967c1b) without its bookkeeping: Adam with the warm-up / decay factor,
    gradient clipping, then the EMA update. Returns the losses."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
    losses = []
    for step in range(steps):
        g = step_generator(cfg.seed, step)
        x0 = data[batch_indices(len(data), cfg.batch_size, cfg.seed, step)]
        t = torch.randint(0, schedule.T, (x0.shape[0],), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        model.train()
        loss = loss_simple(model, schedule, x0, t, eps, reduction="none").mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        ema.update_parameters(model)
        losses.append(loss.item())
    return losses, ema


def test_training_steps_match_the_previous_implementation_exactly(make_trainer):
    trainer = make_trainer(lr=1e-3, warmup_steps=2, lr_decay="cosine", steps=5, grad_clip=0.5)
    model = copy.deepcopy(trainer.model)
    losses, ema = _previous_implementation_steps(model, trainer.data, trainer.cfg, trainer.schedule, 5)
    trainer.fit(progress=False)
    assert trainer.history.loss == losses                                      # bit for bit
    for (name, a), b in zip(trainer.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(trainer.ema.module.state_dict().items(), ema.module.state_dict().values()):
        assert torch.equal(a, b), name


# --- the loop's bookkeeping ---------------------------------------------------------------------

def test_fit_bookkeeping(make_trainer, monkeypatch):
    clock = iter([10.0, 12.5, 20.0, 21.0])       # fit reads the clock once at its start and once at its end
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    trainer = make_trainer()
    hist = trainer.fit(progress=False)
    assert trainer.step == 4 and len(hist.loss) == 4
    assert all(math.isfinite(v) and v > 0 for v in hist.loss)
    assert sum(hist.t_bucket_count) == 4 * 8
    assert hist.seconds == 2.5
    # recompute each step's t from its (seed, step) generator, independently of the trainer
    K, T, expected = 5, 100, [0] * 5
    for step in range(4):
        t = torch.randint(0, T, (8,), generator=step_generator(0, step))
        for b in (t * K // T).tolist():
            expected[b] += 1
    assert hist.t_bucket_count == expected
    means = hist.bucket_means()
    assert all((c == 0) == math.isnan(m) for c, m in zip(hist.t_bucket_count, means))
    assert sum(hist.t_bucket_sum) == pytest.approx(sum(hist.loss) * 8, rel=1e-5)
    # fit continues up to a total, not by a count, and its time adds up
    trainer.fit(steps=6, progress=False)
    assert trainer.step == 6 and len(hist.loss) == 6 and hist.seconds == 3.5


def test_same_seed_same_run(make_trainer):
    a = make_trainer().fit(progress=False).loss
    b = make_trainer().fit(progress=False).loss
    assert a == b
    c = make_trainer(seed=1).fit(progress=False).loss        # another init, batch order, t and eps
    assert c != a


def test_lr_is_set_from_schedule(make_trainer):
    trainer = make_trainer(lr=1e-3, warmup_steps=4, steps=10, lr_decay="cosine")
    for step in range(3):
        trainer.train_step()
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (step + 1) / 4)


def test_ema_follows_the_model(make_trainer):
    trainer = make_trainer(ema_decay=0.5)
    name = "conv_in.weight"
    trainer.train_step()
    w1 = dict(trainer.model.named_parameters())[name].detach().clone()
    assert torch.equal(dict(trainer.ema.module.named_parameters())[name], w1)     # first update copies
    trainer.train_step()
    w2 = dict(trainer.model.named_parameters())[name].detach()
    torch.testing.assert_close(dict(trainer.ema.module.named_parameters())[name], 0.5 * w1 + 0.5 * w2)
    assert not torch.equal(w1, w2)


def test_power_ema_follows_karras_beta(make_trainer):
    """ema_power gamma: after the n-th step hat-theta_n = beta_n hat-theta_{n-1} + (1 - beta_n) theta_n
    with beta_n = (1 - 1/n)^(gamma + 1) (Karras et al. 2024); beta_1 = 0 copies the first weights."""
    trainer = make_trainer(ema_power=3.0, ema_decay=0.5)     # ema_decay is ignored
    name, expected = "conv_in.weight", None
    for n in range(1, 4):
        trainer.train_step()
        w = dict(trainer.model.named_parameters())[name].detach().clone()
        beta = (1 - 1 / n) ** 4
        expected = w if expected is None else beta * expected + (1 - beta) * w
        torch.testing.assert_close(dict(trainer.ema.module.named_parameters())[name], expected)
    assert not torch.allclose(expected, w)       # the average is not just the last weights


def test_adam_beta2_reaches_the_optimizer(make_trainer):
    assert make_trainer().optimizer.param_groups[0]["betas"] == (0.9, 0.999)     # the paper's Adam
    assert make_trainer(adam_beta2=0.99).optimizer.param_groups[0]["betas"] == (0.9, 0.99)


def test_min_snr_weight_scales_each_samples_loss(make_trainer):
    """loss_weight="min_snr": the optimised loss is mean_b w_{t_b} ||eps - eps_theta||^2 with the
    Min-SNR weights, on the same batch (same seed and step) as L_simple."""
    plain, weighted = make_trainer(seed=1), make_trainer(seed=1, loss_weight="min_snr", min_snr_gamma=2.0)
    x0, t, eps, _ = weighted.draw_batch()
    with torch.no_grad():
        per_sample = loss_simple(weighted.model, weighted.schedule, x0, t, eps, reduction="none")
    snr = weighted.schedule.snr[t]
    expected = (torch.minimum(snr, torch.tensor(2.0)) / snr * per_sample).mean().item()
    assert weighted.train_step().item() == pytest.approx(expected, rel=1e-5)
    assert plain.train_step().item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    assert expected < per_sample.mean().item()          # the nearly clean timesteps count less


def test_cpu_bf16_autocast_is_opt_in(make_trainer):
    """cpu_precision="bf16" runs the network's forward in bf16 on the CPU (weights, optimiser and
    loss stay fp32): the loss is close to fp32's, not equal; the default is fp32."""
    fp32, bf16 = make_trainer(seed=2), make_trainer(seed=2, cpu_precision="bf16")
    assert not fp32.amp and bf16.amp and bf16.amp_dtype == torch.bfloat16
    seen = []
    hook = bf16.model.conv_in.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    a, b = fp32.train_step().item(), bf16.train_step().item()
    hook.remove()
    assert seen == [torch.bfloat16] and bf16.model.conv_in.weight.dtype == torch.float32
    assert a != b and b == pytest.approx(a, rel=0.05)


def test_nan_loss_stops_at_the_next_read_back_and_nothing_is_saved_after_it(make_trainer, monkeypatch, tmp_path):
    """A NaN loss (a diverged network) stops training at the next read-back of the loss (every
    LOG_EVERY steps and before every save), naming its step; the history keeps the good steps,
    and the run is not saved any more: the checkpoint on disk stays the last good one."""
    path = tmp_path / "ck.pt"
    trainer = make_trainer(steps=40)
    trainer.fit(steps=2, progress=False, checkpoint_path=path)
    saved = path.read_bytes()
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda *args: forward(*args) * float("nan"))  # still has a grad
    with pytest.raises(FloatingPointError, match=r"training loss became nan at step 2; lower the learning rate"):
        trainer.fit(progress=False, checkpoint_path=path, checkpoint_every=10)
    assert trainer.step == 10 and len(trainer.history.loss) == 2     # stopped at the read-back before the save
    assert trainer.diverged_at == 2 and path.read_bytes() == saved
    with pytest.raises(FloatingPointError, match=f"not saved to {path}: the training loss became NaN or inf at step 2"):
        trainer.save(path)
    assert path.read_bytes() == saved
    trainer.resume(path)                                                 # a resumed run may save again
    assert trainer.diverged_at is None and trainer.step == 2


def test_a_training_step_reads_nothing_back(make_trainer, monkeypatch, tmp_path):
    """No read-back in a step (on a GPU each waits for the device): the step's loss, t and
    per-sample losses stay where they are until the losses are read back, every LOG_EVERY steps,
    before each save, and when the history is read."""
    trainer = make_trainer(steps=60)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda *a: pytest.fail("a training step called Tensor.tolist"))
    monkeypatch.setattr(train_module, "finite_loss", lambda *a: pytest.fail("a training step read the loss back"))
    for _ in range(3):
        trainer.train_step()
    assert trainer._history.loss == [] and len(trainer._pending) == 3 and trainer.step == 3
    monkeypatch.undo()
    assert len(trainer.history.loss) == 3 and not trainer._pending          # reading the history reads back
    reads, read_back = [], trainer.read_back
    monkeypatch.setattr(trainer, "read_back", lambda: reads.append(trainer.step) or read_back())
    trainer.fit(progress=False, checkpoint_path=tmp_path / "ck.pt", checkpoint_every=40)
    assert reads == [25, 40, 50, 60, 60] and len(trainer.history.loss) == 60


# --- Ctrl-C, and nothing written when nothing ran ---------------------------------------------------

def _interrupt_at(trainer, monkeypatch, at_step):
    """Make train_step raise KeyboardInterrupt (Ctrl-C) when ``at_step`` steps are done."""
    step = trainer.train_step

    def train_step():
        if trainer.step == at_step:
            raise KeyboardInterrupt
        return step()
    monkeypatch.setattr(trainer, "train_step", train_step)


def test_ctrl_c_saves_a_resumable_checkpoint(make_trainer, monkeypatch, tmp_path, capsys):
    straight = make_trainer(steps=6)
    straight.fit(progress=False)

    path = tmp_path / "ck.pt"
    trainer = make_trainer(steps=6)
    _interrupt_at(trainer, monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(progress=False, checkpoint_path=path)
    assert f"interrupted at step 3: saved a resumable checkpoint to {path}" in capsys.readouterr().out
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 3 and len(ckpt["history"]["loss"]) == 3 and "optimizer" in ckpt

    resumed = make_trainer(steps=6, seed=0).resume(path)
    resumed.fit(progress=False)
    assert resumed.history.loss == straight.history.loss
    assert torch.equal(resumed.model.conv_in.weight, straight.model.conv_in.weight)
    assert torch.equal(resumed.ema.module.conv_in.weight, straight.ema.module.conv_in.weight)


def test_ctrl_c_in_the_callback_saves_too(make_trainer, tmp_path):
    path = tmp_path / "ck.pt"

    def callback(trainer):
        if trainer.step == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        make_trainer(steps=6).fit(progress=False, callback=callback, checkpoint_path=path, checkpoint_every=2)
    assert load_checkpoint(path)["step"] == 2


def test_no_checkpoint_when_no_step_ran(make_trainer, monkeypatch, tmp_path):
    path = tmp_path / "ck.pt"
    trainer = make_trainer()
    _interrupt_at(trainer, monkeypatch, 0)                 # Ctrl-C before the first step
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(progress=False, checkpoint_path=path)
    assert not path.exists()

    done = make_trainer()
    done.fit(progress=False)                               # 4 of 4 steps: nothing left to run
    done.fit(progress=False, checkpoint_path=path)
    assert not path.exists()
    with pytest.raises(ValueError, match="checkpoint_every must be >= 0"):
        done.fit(progress=False, checkpoint_every=-1)


def test_checkpoint_every_saves_along_the_way(make_trainer, tmp_path):
    seen = []
    path = tmp_path / "ck.pt"
    make_trainer(steps=4).fit(progress=False, checkpoint_path=path, checkpoint_every=2,
                              callback=lambda tr: seen.append((tr.step, load_checkpoint(path)["step"])))
    assert seen == [(2, 2), (4, 4), (4, 4)]                # every 2 steps, then at the end


# --- data checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("data, error, message", [
    (torch.rand(16, 1, 8, 8), ValueError, r"looks scaled to \[0, 1\].*use 2 \* x - 1"),
    (torch.linspace(0, 255, 64).reshape(1, 1, 8, 8), ValueError, r"must lie in \[-1, 1\], got values in \[0, 255\]"),
    (torch.zeros(0, 1, 8, 8), ValueError, "training data: need at least 1 images, got 0"),
    (torch.full((4, 1, 8, 8), float("nan")), ValueError, "training data contain NaN or inf"),
    (torch.zeros(4, 8, 8), ValueError, r"training data must have shape \(B, 1, 8, 8\), got \(4, 8, 8\)"),
    (torch.zeros(4, 1, 16, 16), ValueError, r"training data must have shape \(B, 1, 8, 8\), got \(4, 1, 16, 16\)"),
    (torch.zeros(4, 3, 8, 8), ValueError, r"training data must have shape \(B, 1, 8, 8\)"),
    (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), TypeError, "floating-point tensor scaled to"),
], ids=["unit_range", "0_255", "empty", "nan", "no_channel", "wrong_size", "rgb", "uint8"])
def test_bad_training_data(make_trainer, tiny_config, data, error, message):
    with pytest.raises(error, match=message):
        check_training_data(data, tiny_config)
    with pytest.raises(error, match=message):             # refused before any training starts
        make_trainer(data=data)


def test_good_training_data_passes(tiny_config, tiny_images):
    check_training_data(tiny_images(), tiny_config)
    check_training_data(torch.zeros(1, 1, 8, 8), tiny_config)     # one blank image is not a scaling mistake


def test_lr_factor():
    from ddpm_tutorial.config import TrainConfig
    cos = TrainConfig(steps=110, warmup_steps=10, lr_decay="cosine")
    assert lr_factor(0, cos) == pytest.approx(0.1)
    assert lr_factor(4, cos) == pytest.approx(0.5)
    assert lr_factor(9, cos) == pytest.approx(1.0)
    assert lr_factor(10, cos) == pytest.approx(1.0)          # cosine starts at the top
    assert lr_factor(60, cos) == pytest.approx(0.55)         # halfway: 0.1 + 0.9 * 0.5
    assert lr_factor(110, cos) == pytest.approx(0.1)         # floor: 10 %
    assert lr_factor(500, cos) == pytest.approx(0.1)
    const = TrainConfig(steps=110, warmup_steps=10, lr_decay="constant")
    assert lr_factor(4, const) == pytest.approx(0.5)
    assert lr_factor(10, const) == lr_factor(109, const) == 1.0
    assert lr_factor(0, TrainConfig(warmup_steps=0)) == 1.0


def test_batch_indices_cover_each_epoch():
    seen = torch.cat([batch_indices(32, 8, seed=3, step=s) for s in range(4)])
    assert sorted(seen.tolist()) == list(range(32))                     # one epoch = a permutation
    nxt = torch.cat([batch_indices(32, 8, seed=3, step=s) for s in range(4, 8)])
    assert sorted(nxt.tolist()) == list(range(32)) and not torch.equal(seen, nxt)
    assert torch.equal(batch_indices(32, 8, 3, 5), batch_indices(32, 8, 3, 5))
    assert len(batch_indices(30, 8, 0, 3)) == 8                          # partial batch dropped
    assert sorted(batch_indices(5, 8, 0, 0).tolist()) == list(range(5))  # fewer images than a batch


def test_history_helpers():
    h = History(loss=[1.0, 2.0, 3.0, 4.0, 5.0])
    assert h.epoch_means(2) == [1.5, 3.5]
    assert h.smoothed(2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    h = History(t_bucket_sum=[2.0, 0.0], t_bucket_count=[4, 0])
    assert h.bucket_means()[0] == 0.5 and math.isnan(h.bucket_means()[1])


def test_trainer_class_still_takes_a_model_directly(tiny_config, tiny_images, make_preset):
    """build_trainer is the way; Trainer(model, data, train, diffusion) stays what it wraps."""
    preset = make_preset()
    torch.manual_seed(preset.train.seed)
    direct = Trainer(UNet(tiny_config, T=100), tiny_images(), preset.train, preset.diffusion, device="cpu")
    built = build_trainer(preset, tiny_images(), device="cpu")
    assert direct.fit(progress=False).loss == built.fit(progress=False).loss
