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
from .config import DiffusionConfig, TrainConfig
from .diffusion import loss_simple
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


def _autocast(device: torch.device, cfg: TrainConfig):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)


class Trainer:
    """Holds model, EMA, optimiser and history so training can stop, save and resume."""

    def __init__(self, model, data: torch.Tensor, train: TrainConfig,
                 diffusion: DiffusionConfig | None = None, device=None):
        if data.ndim != 4 or not data.is_floating_point():
            raise ValueError(f"training data must be float (N, C, H, W) in [-1, 1], "
                             f"got {tuple(data.shape)} {data.dtype}")
        if data.numel() and (data.min() < -1.001 or data.max() > 1.001):
            raise ValueError(f"training data must be scaled to [-1, 1], got range "
                             f"[{data.min():.3f}, {data.max():.3f}]")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cfg, self.diffusion_cfg = train, diffusion or DiffusionConfig()
        self.schedule = NoiseSchedule.from_config(self.diffusion_cfg).to(self.device)
        self.data = data
        self.model = model.to(self.device)
        if train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(train.ema_decay))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=train.lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda")
        self.step = 0
        self.history = History(t_bucket_sum=[0.0] * train.num_t_buckets,
                               t_bucket_count=[0] * train.num_t_buckets)

    def train_step(self) -> float:
        """Algorithm 1, one iteration. Returns the batch's L_simple."""
        cfg, step = self.cfg, self.step
        g = step_generator(cfg.seed, step)
        x0 = self.data[batch_indices(len(self.data), cfg.batch_size, cfg.seed, step)]   # line 2
        t = torch.randint(0, self.schedule.T, (x0.shape[0],), generator=g)              # line 3
        eps = torch.randn(x0.shape, generator=g)                                        # line 4
        x0, t, eps = x0.to(self.device), t.to(self.device), eps.to(self.device)
        if cfg.channels_last:
            x0, eps = x0.contiguous(memory_format=torch.channels_last), eps.contiguous(memory_format=torch.channels_last)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        self.model.train()
        with _autocast(self.device, cfg):
            per_sample = loss_simple(self.model, self.schedule, x0, t, eps, reduction="none")
        loss = per_sample.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; "
                                     "lower the learning rate or check the data scaling")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()                                              # line 5
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update_parameters(self.model)
        self._record(loss.item(), t, per_sample.detach())
        self.step += 1
        return loss.item()

    def _record(self, loss: float, t: torch.Tensor, per_sample: torch.Tensor) -> None:
        self.history.loss.append(loss)
        K = self.cfg.num_t_buckets
        buckets = (t * K // self.schedule.T).cpu()
        for b, v in zip(buckets.tolist(), per_sample.float().cpu().tolist()):
            self.history.t_bucket_sum[b] += v
            self.history.t_bucket_count[b] += 1

    def fit(self, steps: int | None = None, progress: bool = True, callback=None,
            checkpoint_path=None, checkpoint_every: int = 0) -> History:
        """Train until ``steps`` total steps (default ``cfg.steps``). ``callback(trainer)``
        runs every ``checkpoint_every`` steps and at the end (e.g. to plot)."""
        steps = self.cfg.steps if steps is None else steps
        start = time.perf_counter()
        bar = tqdm(range(self.step, steps), desc="training", disable=not progress,
                   initial=self.step, total=steps)
        for _ in bar:
            loss = self.train_step()
            if self.step % 25 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")
            if checkpoint_every and self.step % checkpoint_every == 0:
                if checkpoint_path:
                    self.save(checkpoint_path)
                if callback:
                    callback(self)
        self.history.seconds += time.perf_counter() - start
        if checkpoint_path:
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


def train_preset(preset, data: torch.Tensor | None = None, device=None, progress: bool = True,
                 checkpoint_path=None, checkpoint_every: int = 0, callback=None) -> Trainer:
    """Build the preset's U-Net, load Fashion-MNIST (the preset's subset) and train it."""
    from .data import load_fashion_mnist
    from .unet import UNet
    torch.manual_seed(preset.train.seed)           # weight initialisation
    if data is None:
        data, _ = load_fashion_mnist(train=True, subset=preset.train.subset)
    trainer = Trainer(UNet(preset.model), data, preset.train, preset.diffusion, device)
    trainer.fit(progress=progress, checkpoint_path=checkpoint_path,
                checkpoint_every=checkpoint_every, callback=callback)
    return trainer
