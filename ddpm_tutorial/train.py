"""One plain training loop: Algorithm 1 of Ho et al. 2020, with an EMA of the weights.

    repeat
        x_0 ~ q(x_0);  t ~ Uniform({1..T});  eps ~ N(0, I)
        gradient step on || eps - eps_theta(sqrt(bar-alpha_t) x_0 + sqrt(1 - bar-alpha_t) eps, t) ||^2
    until converged

Each step's batch, t and eps come from a generator seeded by (seed, step), so a
run is reproducible, resuming continues the very same sequence, and every model
trained with one seed sees the same data order (the ablation relies on that).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .checkpoint import configs_from_checkpoint, load_checkpoint, load_weights, save_checkpoint
from .config import DiffusionConfig, ModelConfig, Preset, TrainConfig, resolve_device
from .diffusion import check_images, loss_simple
from .schedules import NoiseSchedule


@dataclass
class History:
    """Loss per step and per bucket of t (bucket b holds t in [b*T/K, (b+1)*T/K))."""
    loss: list = field(default_factory=list)
    t_bucket_sum: list = field(default_factory=list)
    t_bucket_count: list = field(default_factory=list)
    seconds: float = 0.0

    def bucket_means(self) -> list:
        return [s / c if c else float("nan") for s, c in zip(self.t_bucket_sum, self.t_bucket_count)]

    def epoch_means(self, steps_per_epoch: int) -> list:
        n = len(self.loss) // steps_per_epoch
        return [sum(self.loss[i * steps_per_epoch:(i + 1) * steps_per_epoch]) / steps_per_epoch
                for i in range(n)]

    def smoothed(self, window: int = 50) -> list:
        out, acc = [], 0.0
        for i, v in enumerate(self.loss):
            acc += v - (self.loss[i - window] if i >= window else 0.0)
            out.append(acc / min(i + 1, window))
        return out


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then constant (paper) or cosine down to 10%."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@functools.lru_cache(maxsize=2)
def epoch_permutation(n_data: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded order of the data in one epoch, computed once per epoch (not per step)."""
    return torch.randperm(n_data, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def batch_indices(n_data: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of step ``step``'s batch: a fresh seeded permutation each epoch, last partial batch dropped."""
    per_epoch = max(1, n_data // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = epoch_permutation(n_data, seed, epoch)
    return perm[k * batch_size:(k + 1) * batch_size] if n_data >= batch_size else perm


def check_training_data(data: torch.Tensor, model_cfg: ModelConfig) -> None:
    """Raise unless ``data`` is float (N, C, H, W) in [-1, 1] that fits the model, N >= 1, and
    not all >= 0 (images scaled to [0, 1] by mistake).
    Checked once, before training, so a long run never starts on data it cannot use."""
    shape = (model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
    check_images(data, "training data", shape=shape, in_range=True, min_count=1)
    lo = data.min().item()
    if lo >= 0 and len(data) > 1:
        raise ValueError(f"training data lies in [{lo:.3f}, {data.max().item():.3f}]: it looks scaled to [0, 1], "
                         "but the model is trained on [-1, 1] (use 2 * x - 1)")


def finite_loss(loss: torch.Tensor, step: int) -> float:
    """The loss as a float (one host sync per step); FloatingPointError when it is NaN or inf."""
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"training loss became {value} at step {step}; lower the "
                                 "learning rate (--lr) or check that the data is scaled to [-1, 1]")
    return value


def check_labels(labels: torch.Tensor | None, n: int, num_classes: int) -> torch.Tensor | None:
    """Labels (N,) in [0, num_classes) for a class-conditional model, None for an unconditional one."""
    if not num_classes:
        if labels is not None:
            raise ValueError("labels were given but the model has no class embedding; "
                             "build it with ModelConfig(num_classes=10) (train --conditional)")
        return None
    if labels is None:
        raise ValueError(f"a class-conditional model (num_classes={num_classes}) needs the labels of its data")
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape ({n},), got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    return labels.long()


class Trainer:
    """Holds model, EMA, optimiser and history so training can stop, save and resume.

    ``data``: the training images, float (N, C, H, W) in [-1, 1], validated once here.
    Build one from a preset with :func:`build_trainer`.
    """

    def __init__(self, model, data: torch.Tensor, train: TrainConfig,
                 diffusion: DiffusionConfig | None = None, device=None, labels: torch.Tensor | None = None):
        check_training_data(data, model.config)
        self.labels = check_labels(labels, len(data), model.config.num_classes)
        self.device = resolve_device(device)
        self.cfg, self.diffusion_cfg = train, diffusion or DiffusionConfig()
        self.schedule = NoiseSchedule.from_config(self.diffusion_cfg).to(self.device)
        self.data = data
        self.model = model.to(self.device)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(train.ema_decay))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=train.lr)
        # fp16 autocast with loss scaling on CUDA (a T4 has fast fp16, no bf16); fp32 on the CPU.
        self.amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.step = 0
        self.history = History(t_bucket_sum=[0.0] * train.num_t_buckets,
                               t_bucket_count=[0] * train.num_t_buckets)

    def train_step(self) -> float:
        """Algorithm 1, one iteration. Returns the batch's L_simple."""
        x0, t, eps, y = self.draw_batch()                # lines 2-4: x_0 ~ q(x_0), t ~ U, eps ~ N(0, I)
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            per_sample = loss_simple(self.model, self.schedule, x0, t, eps, reduction="none", y=y)
        loss = per_sample.mean()
        value = finite_loss(loss, self.step)             # refuses a NaN loss before it reaches the weights
        self.gradient_step(loss)                         # line 5: a gradient step on the loss
        self.ema.update_parameters(self.model)
        self.record(value, t, per_sample)                # history and step change together, last
        return value

    def draw_batch(self):
        """Algorithm 1, lines 2-4, drawn from a generator seeded by (seed, step):
        x0 (B, C, H, W), t (B,) code indices in [0, T), eps (B, C, H, W), on the device, and
        for a class-conditional model the labels y (B,), each replaced by the null class with
        probability p_uncond (Ho & Salimans 2022); y is None for an unconditional model."""
        g = step_generator(self.cfg.seed, self.step)
        idx = batch_indices(len(self.data), self.cfg.batch_size, self.cfg.seed, self.step)
        x0 = self.data[idx]
        t = torch.randint(0, self.schedule.T, (x0.shape[0],), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        y = None
        if self.labels is not None:
            drop = torch.rand(x0.shape[0], generator=g) < self.cfg.p_uncond
            y = torch.where(drop, self.model.config.num_classes, self.labels[idx]).to(self.device)
        return x0.to(self.device), t.to(self.device), eps.to(self.device), y

    def gradient_step(self, loss: torch.Tensor) -> None:
        """Adam on the loss, with the preset's learning-rate schedule and gradient clipping
        (the paper's code clips at norm 1); loss scaling when fp16 autocast is on."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(self.step, self.cfg)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def record(self, loss: float, t: torch.Tensor, per_sample: torch.Tensor) -> None:
        """Append the step's loss, add each sample's loss to its t bucket, count the step. Done
        last in a step, so a Ctrl-C in the middle of a step never leaves the history one ahead."""
        K = self.cfg.num_t_buckets
        buckets = (t * K // self.schedule.T).cpu().tolist()
        values = per_sample.detach().float().cpu().tolist()
        self.history.loss.append(loss)
        for b, v in zip(buckets, values):
            self.history.t_bucket_sum[b] += v
            self.history.t_bucket_count[b] += 1
        self.step += 1

    def fit(self, steps: int | None = None, progress: bool = True, callback=None,
            checkpoint_path=None, checkpoint_every: int = 0) -> History:
        """Train until ``steps`` total steps (default ``cfg.steps``), saving to ``checkpoint_path``
        every ``checkpoint_every`` steps (0: only at the end) and at the end; ``callback(trainer)``
        runs at the same moments (e.g. to plot). Nothing is saved when no step ran.

        Ctrl-C (KeyboardInterrupt) saves a resumable checkpoint first, then re-raises.
        """
        steps = self.cfg.steps if steps is None else steps
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0: only at the end), got {checkpoint_every}")
        first, start = self.step, time.perf_counter()
        bar = tqdm(range(self.step, steps), desc="training", disable=not progress,
                   initial=self.step, total=steps, mininterval=2.0)
        try:
            for _ in bar:
                loss = self.train_step()
                if self.step % 25 == 0:
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if checkpoint_every and self.step % checkpoint_every == 0:
                    if checkpoint_path:
                        self.save(checkpoint_path)
                    if callback:
                        callback(self)
        except KeyboardInterrupt:
            del self.history.loss[self.step:]            # a step cut short inside record()
            self.history.seconds += time.perf_counter() - start
            bar.close()
            if checkpoint_path and self.step > first:
                self.save(checkpoint_path)
                print(f"interrupted at step {self.step}: saved a resumable checkpoint to {checkpoint_path}")
            raise
        bar.close()
        self.history.seconds += time.perf_counter() - start
        if checkpoint_path and self.step > first:
            self.save(checkpoint_path)
        if callback:
            callback(self)
        return self.history

    def state(self, include_optimizer: bool = True) -> dict:
        model_cfg = self.model.config
        state = {
            "config": {"model": dataclasses.asdict(model_cfg),
                       "diffusion": dataclasses.asdict(self.diffusion_cfg),
                       "train": dataclasses.asdict(self.cfg)},
            "step": self.step,
            "ema": self.ema.module.state_dict(),
            "history": dataclasses.asdict(self.history),
        }
        if include_optimizer:
            state["model"] = self.model.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def save(self, path, include_optimizer: bool = True):
        return save_checkpoint(path, self.state(include_optimizer))

    def resume(self, path) -> "Trainer":
        """Continue from a checkpoint written by :meth:`save` (model config must match)."""
        ckpt = load_checkpoint(path, map_location=self.device)
        model_cfg, diffusion_cfg, _ = configs_from_checkpoint(ckpt)
        if model_cfg != self.model.config or diffusion_cfg != self.diffusion_cfg:
            raise ValueError(f"checkpoint {path} was trained with {model_cfg} / {diffusion_cfg}, "
                             f"not this trainer's {self.model.config} / {self.diffusion_cfg}")
        if "optimizer" not in ckpt:
            raise ValueError(f"checkpoint {path} holds no optimiser state (an exported "
                             "checkpoint); it can be sampled from but not resumed")
        load_weights(self.model, ckpt["model"], "model")
        load_weights(self.ema.module, ckpt["ema"], "ema")
        self.ema.n_averaged.fill_(ckpt["step"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = ckpt["step"]
        self.history = History(**ckpt["history"])
        return self


def build_trainer(preset: Preset, data: torch.Tensor | None = None, device=None,
                  model: ModelConfig | None = None, train: TrainConfig | None = None,
                  labels: torch.Tensor | None = None) -> Trainer:
    """The one way to assemble a :class:`Trainer`: the preset's configs (``model`` / ``train``
    replace them, e.g. for the ablation's variants), weights initialised from ``train.seed``
    (the same seed gives the same initial network), Fashion-MNIST loaded when ``data`` is None
    (with its labels, which a class-conditional model needs)."""
    from .data import load_fashion_mnist
    from .unet import UNet
    model, train = model or preset.model, train or preset.train
    with torch.random.fork_rng(devices=[]):      # seed the initialisation without touching global RNG
        torch.manual_seed(train.seed)
        net = UNet(model, T=preset.diffusion.T)
    if data is None:
        data, labels = load_fashion_mnist(train=True, subset=train.subset)
    return Trainer(net, data, train, preset.diffusion, device,
                   labels=labels if model.num_classes else None)
