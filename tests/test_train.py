"""Training: learning works (overfit one batch), the loop's bookkeeping, EMA, lr schedule, errors."""
import math

import pytest
import torch

from ddpm_tutorial.config import DiffusionConfig, ModelConfig, TrainConfig
from ddpm_tutorial.diffusion import loss_simple
from ddpm_tutorial.schedules import make_schedule
from ddpm_tutorial.train import History, Trainer, batch_indices, lr_factor, step_generator
from ddpm_tutorial.unet import UNet

CFG = ModelConfig(image_size=8, base_channels=8, channel_mults=(1, 2), groups=4)
DIFF = DiffusionConfig(T=100)


def tiny_data(n=32, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def make_trainer(data=None, init_seed=0, **train_kw):
    kw = dict(steps=4, batch_size=8, warmup_steps=2, num_t_buckets=5, ema_decay=0.9)
    kw.update(train_kw)
    torch.manual_seed(init_seed)                       # weight initialisation
    return Trainer(UNet(CFG), tiny_data() if data is None else data, TrainConfig(**kw), DIFF, device="cpu")


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


def test_fit_bookkeeping():
    trainer = make_trainer()
    hist = trainer.fit(progress=False)
    assert trainer.step == 4 and len(hist.loss) == 4
    assert all(math.isfinite(v) and v > 0 for v in hist.loss)
    assert sum(hist.t_bucket_count) == 4 * 8
    assert hist.seconds > 0
    # recompute each step's t from its (seed, step) generator, independently of the trainer
    K, T, expected = 5, DIFF.T, [0] * 5
    for step in range(4):
        t = torch.randint(0, T, (8,), generator=step_generator(0, step))
        for b in (t * K // T).tolist():
            expected[b] += 1
    assert hist.t_bucket_count == expected
    means = hist.bucket_means()
    assert all((c == 0) == math.isnan(m) for c, m in zip(hist.t_bucket_count, means))
    assert sum(hist.t_bucket_sum) == pytest.approx(sum(hist.loss) * 8, rel=1e-5)
    # fit continues up to a total, not by a count
    trainer.fit(steps=6, progress=False)
    assert trainer.step == 6 and len(hist.loss) == 6


def test_same_seed_same_run():
    a = make_trainer().fit(progress=False).loss
    b = make_trainer().fit(progress=False).loss
    assert a == b
    c = make_trainer(seed=1).fit(progress=False).loss        # same weights, another batch order / t / eps
    assert c != a
    d = make_trainer(init_seed=1).fit(progress=False).loss   # same batches, other initial weights
    assert d != a


def test_lr_is_set_from_schedule():
    trainer = make_trainer(lr=1e-3, warmup_steps=4, steps=10, lr_decay="cosine")
    for step in range(3):
        trainer.train_step()
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (step + 1) / 4)


def test_ema_follows_the_model():
    trainer = make_trainer(ema_decay=0.5)
    name = "conv_in.weight"
    trainer.train_step()
    w1 = dict(trainer.model.named_parameters())[name].detach().clone()
    assert torch.equal(dict(trainer.ema.module.named_parameters())[name], w1)     # first update copies
    trainer.train_step()
    w2 = dict(trainer.model.named_parameters())[name].detach()
    torch.testing.assert_close(dict(trainer.ema.module.named_parameters())[name], 0.5 * w1 + 0.5 * w2)
    assert not torch.equal(w1, w2)


def test_nan_loss_stops_with_the_step(monkeypatch):
    trainer = make_trainer()
    trainer.fit(steps=2, progress=False)
    monkeypatch.setattr(trainer.model, "forward", lambda x, t: torch.full_like(x, float("nan")))
    with pytest.raises(FloatingPointError, match=r"training loss became nan at step 2; lower the learning rate"):
        trainer.fit(progress=False)
    assert trainer.step == 2 and len(trainer.history.loss) == 2


def test_bad_training_data():
    with pytest.raises(ValueError, match=r"must be scaled to \[-1, 1\], got range \[0.000, 255.000\]"):
        make_trainer(data=torch.linspace(0, 255, 64).reshape(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"must be float \(N, C, H, W\) in \[-1, 1\], got \(4, 8, 8\) torch.float32"):
        make_trainer(data=torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match=r"got \(4, 1, 8, 8\) torch.uint8"):
        make_trainer(data=torch.zeros(4, 1, 8, 8, dtype=torch.uint8))


def test_lr_factor():
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
