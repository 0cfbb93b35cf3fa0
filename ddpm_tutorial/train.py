"""One plain training loop: Algorithm 1 of Ho et al. 2020, with an EMA of the weights.

    repeat
        x_0 ~ q(x_0);  t ~ Uniform({1..T});  eps ~ N(0, I)
        gradient step on || eps - eps_theta(sqrt(bar-alpha_t) x_0 + sqrt(1 - bar-alpha_t) eps, t) ||^2
    until converged

Each step's batch, t and eps come from a generator seeded by (seed, step), so a
run is reproducible, resuming continues the very same sequence, and every model
trained with one seed sees the same data order (the ablation relies on that).

The same loop runs on one process or on many started by torchrun (distributed.py): the
seeded draw gives the *global* batch of ``batch_size`` images, rank r of W computes on its
slice r of W, DistributedDataParallel averages the gradients, so every rank takes the same
step and W processes train the same run as one (up to float summation order). Rank 0 alone
logs, saves and shows progress.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import configs_from_checkpoint, load_checkpoint, load_weights, save_checkpoint
from .checks import check_images, door
from .config import DiffusionConfig, ModelConfig, Preset, TrainConfig, resolve_device
from .diffusion import loss_simple, loss_weight
from .schedules import NoiseSchedule


@dataclass
class History:
    """Loss per step and per bucket of t (bucket b holds t in [b*T/K, (b+1)*T/K))."""
    loss: list = field(default_factory=list)
    t_bucket_sum: list = field(default_factory=list)
    t_bucket_count: list = field(default_factory=list)
    seconds: float = 0.0

    def add(self, loss: float, buckets: list, values: list) -> None:
        """One step: its loss, and each sample's loss (``values``) added to its t bucket."""
        self.loss.append(loss)
        for b, v in zip(buckets, values):
            self.t_bucket_sum[b] += v
            self.t_bucket_count[b] += 1

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


def ema_update(cfg: TrainConfig):
    """The EMA's update of its weights after each step, for ``AveragedModel(multi_avg_fn=...)``:

        hat-theta <- beta hat-theta + (1 - beta) theta,  beta = ema_decay              (fixed)
        beta_n = (1 - 1/n)^(gamma + 1) after the n-th step, gamma = ema_power      (Karras et al. 2024)

    The power-function EMA averages over a window that grows with training (about the last
    n / (gamma + 1) steps), so a short run is not stuck with its early weights, which a fixed
    decay keeps for about 1 / (1 - beta) steps."""
    if not cfg.ema_power:
        return get_ema_multi_avg_fn(cfg.ema_decay)

    @torch.no_grad()
    def power_ema(averaged: list, current: list, num_averaged: torch.Tensor) -> None:
        n = float(num_averaged) + 1             # this is the n-th weight averaged (the first is copied)
        torch._foreach_lerp_(averaged, current, 1 - (1 - 1 / n) ** (cfg.ema_power + 1))
    return power_ema


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


class ShardSampler(torch.utils.data.Sampler):
    """The batch sampler of the streamed path (a folder too large for memory): for step
    ``start``, ``start + 1``, ... it yields rank ``rank``'s slice of :func:`batch_indices`,
    the same global batches the in-memory path draws, cut in ``world`` equal, disjoint shards.

    Not torch's DistributedSampler: that one deals an epoch out round-robin and restarts
    at an epoch boundary, so a run resumed mid-epoch, or under another world size, would see
    other batches. This one is a function of (seed, step) alone."""

    def __init__(self, n_data: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        self.n_data, self.batch_size, self.seed, self.start = n_data, batch_size, seed, start
        self.rank, self.world = rank, world

    def __iter__(self):
        for step in itertools.count(self.start):
            idx = batch_indices(self.n_data, self.batch_size, self.seed, step)
            b = len(idx) // self.world
            yield idx[self.rank * b:(self.rank + 1) * b].tolist()


def check_training_data(data, model_cfg: ModelConfig) -> None:
    """Raise unless ``data`` is float (N, C, H, W) in [-1, 1] that fits the model, N >= 1, and
    not all >= 0 (images scaled to [0, 1] by mistake); or an image folder dataset
    (image_folder.ImageFolder) whose images have the model's shape.
    Checked once, before training, so a long run never starts on data it cannot use."""
    shape = (model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "image_shape"):
        if tuple(data.image_shape) != shape or len(data) < 1:
            raise ValueError(f"training images must have shape (B, {', '.join(map(str, shape))}), the folder "
                             f"gives {len(data)} of {tuple(data.image_shape)}")
        return
    check_images(data, "training data", shape=shape, in_range=True, min_count=1)
    lo = data.min().item()
    if lo >= 0 and len(data) > 1:
        raise ValueError(f"training data lies in [{lo:.3f}, {data.max().item():.3f}]: it looks scaled to [0, 1], "
                         "but the model is trained on [-1, 1] (use 2 * x - 1)")


def check_global_batch(batch_size: int, world: int) -> None:
    """``batch_size`` is the global batch: each of ``world`` processes computes an equal share."""
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is the global batch, split evenly among the {world} "
                         f"processes; choose a multiple of {world}")


def finite_loss(loss, step: int) -> float:
    """The loss (a float or a one-element tensor) as a float; FloatingPointError when it is NaN or inf."""
    value = float(loss)
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


class Draw(NamedTuple):
    """What Algorithm 1's lines 2-4 draw for one step: which images (idx, (B,)), t (B,), eps
    (B, C, H, W), the class labels y (B,) of a class-conditional model (else None) and which
    images are mirrored (flip (B,) bool, with hflip; else None). All on the CPU."""
    idx: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    y: torch.Tensor | None
    flip: torch.Tensor | None

    def shard(self, rank: int, world: int) -> "Draw":
        """Process ``rank``'s equal slice of the global batch (all of it with one process)."""
        b = len(self.idx) // world
        return Draw(*(None if v is None else v[rank * b:(rank + 1) * b] for v in self))


def draw_global_batch(step: int, cfg: TrainConfig, n_data: int, image_shape: tuple, T: int,
                      labels: torch.Tensor | None = None, null_class: int = 0) -> Draw:
    """Algorithm 1, lines 2-4, for step ``step`` of a run: the global batch of ``cfg.batch_size``,
    drawn on the CPU from a generator seeded by (cfg.seed, step), so every device and every
    process draws the same batch, and a resumed run the batch it would have drawn.

    x_0 ~ q(x_0) is ``idx``, which of the ``n_data`` training images; ``t`` holds code indices
    in [0, T); eps has ``image_shape`` per image. ``labels`` (n_data,): the classes of a
    class-conditional model, each replaced by ``null_class`` with probability cfg.p_uncond
    (Ho & Salimans 2022). cfg.hflip: each image mirrored with probability 1/2.
    """
    g = step_generator(cfg.seed, step)
    idx = batch_indices(n_data, cfg.batch_size, cfg.seed, step)       # line 2: x_0 ~ q(x_0)
    t = torch.randint(0, T, (len(idx),), generator=g)                 # line 3: t ~ Uniform({1, ..., T})
    eps = torch.randn((len(idx), *image_shape), generator=g)          # line 4: eps ~ N(0, I)
    y = None
    if labels is not None:
        drop = torch.rand(len(idx), generator=g) < cfg.p_uncond
        y = torch.where(drop, null_class, labels[idx])
    flip = torch.rand(len(idx), generator=g) < 0.5 if cfg.hflip else None
    return Draw(idx, t, eps, y, flip)


# A set whose float32 tensor takes at most this many bytes is held on the training device
# (Fashion-MNIST: 188 MB), so a step's batch is one indexing there; a larger one stays in the
# host's memory and each batch is copied over.
ON_DEVICE_BYTES = 2 ** 30


class InMemory:
    """Training images held as one tensor (N, C, H, W) in [-1, 1]."""

    def __init__(self, images: torch.Tensor, device: torch.device):
        self.device = device
        on_device = images.numel() * images.element_size() <= ON_DEVICE_BYTES
        self.images = images.to(device) if on_device else images

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def batch(self, idx: torch.Tensor, step: int) -> torch.Tensor:
        """The images ``idx`` (b,) of step ``step``, on the device."""
        return to_device(self.images[to_device(idx, self.images.device)], self.device)

    def close(self) -> None:
        pass


class Streamed:
    """An image folder too large for memory (image_folder.ImageFolder): DataLoader workers decode
    this process's shard of each step ahead (:class:`ShardSampler`), restarted at the current step
    after a resume or a repeated draw."""

    def __init__(self, folder, cfg: TrainConfig, device: torch.device, rank: int, world: int, workers: int):
        self.folder, self.cfg, self.device, self.workers = folder, cfg, device, workers
        self.rank, self.world = rank, world
        self.image_shape, self._stream, self._next = tuple(folder.image_shape), None, None

    def __len__(self) -> int:
        return len(self.folder)

    def batch(self, idx: torch.Tensor, step: int) -> torch.Tensor:
        """This process's images of step ``step`` (the sampler draws the same ``idx``), on the device."""
        if self._stream is None or self._next != step:
            sampler = ShardSampler(len(self.folder), self.cfg.batch_size, self.cfg.seed, step, self.rank, self.world)
            self._stream = iter(torch.utils.data.DataLoader(
                self.folder, batch_sampler=sampler, num_workers=self.workers, pin_memory=self.device.type == "cuda"))
        self._next = step + 1
        return next(self._stream).to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the loader's workers."""
        self._stream = None


def to_device(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """``x`` on ``device``; a CPU tensor bound for a GPU is pinned and copied without making the
    host wait for the copy."""
    if x is None or x.device.type != "cpu" or device.type == "cpu":
        return x if x is None else x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


LOG_EVERY = 25      # steps between two read-backs of the loss (the progress bar's loss)


def autocast_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype a run computes in under autocast, None for fp32. On CUDA ``train.precision``:
    fp16 with loss scaling (a T4 has fast fp16, no bf16) or bf16 (its range is fp32's: no
    scaling; fp16 on a GPU without bf16). On the CPU fp32, unless cpu_precision asks for bf16,
    which only CPUs with bf16 instructions run fast (bench/cpu_efficiency.py measures it)."""
    cuda = device.type == "cuda"
    precision = train.precision if cuda else train.cpu_precision
    if precision == "fp32":
        return None
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported(False):
        distributed.print0(f"{torch.cuda.get_device_name(device)} has no bf16: training in fp16 instead")
        return torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


class Trainer:
    """Holds model, EMA, optimiser and history so training can stop, save and resume.

    ``data``: the training images, float (N, C, H, W) in [-1, 1], validated once here, or an
    image folder too large for memory (image_folder.ImageFolder), streamed by a DataLoader with
    ``loader_workers`` processes. Build one from a preset with :func:`build_trainer`.

    Under torchrun (a process group is initialised: distributed.init) the model is wrapped in
    DistributedDataParallel and each rank computes ``batch_size / world_size`` of every batch.
    """

    def __init__(self, model, data, train: TrainConfig,
                 diffusion: DiffusionConfig | None = None, device=None, labels: torch.Tensor | None = None,
                 loader_workers: int = 2):
        check_training_data(data, model.config)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        check_global_batch(train.batch_size, self.world)
        if self.world > 1 and len(data) < train.batch_size:
            raise ValueError(f"{len(data)} training images are fewer than one global batch of {train.batch_size}; "
                             "use more images or a smaller --batch-size")
        self.labels = check_labels(labels, len(data), model.config.num_classes)
        self.device = resolve_device(device)
        self.cfg, self.diffusion_cfg = train, diffusion or DiffusionConfig()
        self.schedule = NoiseSchedule.from_config(self.diffusion_cfg).to(self.device)
        self.data = data
        self.source = (InMemory(data, self.device) if isinstance(data, torch.Tensor)
                       else Streamed(data, train, self.device, self.rank, self.world, loader_workers))
        self.model = model.to(self.device)
        # What computes the loss: the model itself, or its DDP wrapper, which all-reduces the
        # gradients during backward (the model's weights and optimiser stay those of self.model).
        self.net = self.model if self.world == 1 else DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_update(train))
        self.weight = loss_weight(self.schedule, train.loss_weight, train.min_snr_gamma)   # (T,): ones = L_simple
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=train.lr, betas=(0.9, train.adam_beta2))
        dtype = autocast_dtype(train, self.device)
        self.amp, self.amp_dtype = dtype is not None, dtype or torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)    # fp16 needs loss scaling
        self.step = 0
        self.last_checkpoint = None       # (path, step) of the last save every rank knows is complete
        self.meta = {}                    # saved beside the state: the preset's name, the class names
        self.diverged_at = None           # the step whose loss was NaN or inf (then nothing is saved)
        self.history = History(t_bucket_sum=[0.0] * train.num_t_buckets,
                               t_bucket_count=[0] * train.num_t_buckets)

    def train_step(self) -> torch.Tensor:
        """Algorithm 1, one iteration. Returns the batch's loss (L_simple unless cfg.loss_weight) as
        a tensor on the device: nothing is read back to the host here (:meth:`read_back`)."""
        x0, t, eps, y = self.draw_batch()                # lines 2-4: x_0 ~ q(x_0), t ~ U, eps ~ N(0, I)
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            per_sample = loss_simple(self.net, self.schedule, x0, t, eps, reduction="none", y=y)
        loss = (self.weight[t] * per_sample).mean()     # L_simple: every weight is 1
        self.gradient_step(loss)                         # line 5: a gradient step on the loss
        self.ema.update_parameters(self.model)           # same weights on every rank: the same EMA
        self.record(loss, t, per_sample)                 # the history's share, and the step counted
        return loss.detach()

    # The data was checked when the Trainer was built, and the batch is the package's own draw:
    # inside a step no door checks again (no read-back of the images' range per step).
    train_step = door(train_step)

    def draw_batch(self):
        """This process's share of step ``self.step``'s batch (:func:`draw_global_batch`; all of it
        with one process), on the device: x0 (b, C, H, W) in [-1, 1], t (b,), eps (b, C, H, W),
        y (b,) or None; b = batch_size / world_size."""
        draw = draw_global_batch(self.step, self.cfg, len(self.source), self.source.image_shape, self.schedule.T,
                                 self.labels, self.model.config.num_classes).shard(self.rank, self.world)
        x0 = self.source.batch(draw.idx, self.step)
        if draw.flip is not None:
            x0 = torch.where(to_device(draw.flip, self.device)[:, None, None, None], x0.flip(-1), x0)
        return x0, *(to_device(v, self.device) for v in (draw.t, draw.eps, draw.y))

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

    def record(self, loss, t: torch.Tensor, per_sample: torch.Tensor) -> None:
        """Keep the step's loss and its samples' (t, loss) where they are, for :meth:`read_back`,
        and count the step. Done last in a step: a step cut short by Ctrl-C is never counted."""
        self._pending.append((self.step, torch.as_tensor(loss).detach(), t, per_sample.detach()))
        self.step += 1

    @property
    def history(self) -> History:
        """Loss per step and per t bucket. Reading it reads back the steps not yet read (with one
        process; with several, :meth:`fit` reads back on every rank at the same steps)."""
        if self._pending and self.world == 1:
            self.read_back()
        return self._history

    @history.setter
    def history(self, history: History) -> None:
        self._history, self._pending = history, []

    def read_back(self) -> float:
        """Move the steps recorded since the last read-back into the history: one read to the host
        for all of them (and, with several processes, one all-reduce and one all-gather), where a
        loop that reads every step waits for the device every step. Returns the last loss.
        FloatingPointError at the first NaN or inf loss; the run is then not saved any more."""
        done = [p for p in self._pending if p[0] < self.step]      # a step cut short has no entry
        self._pending = []
        if done:
            steps, losses, t, per_sample = zip(*done)
            losses, t, per_sample = torch.stack(losses).float(), torch.stack(t), torch.stack(per_sample).float()
            if self.world > 1:
                losses, t, per_sample = self._global(losses, t, per_sample)      # (k,), (k, B), (k, B)
            buckets = t * self.cfg.num_t_buckets // self.schedule.T
            for step, loss, b, v in zip(steps, losses.tolist(), buckets.tolist(), per_sample.tolist()):
                if not math.isfinite(loss):
                    self.diverged_at = step               # its weights have changed since: save() refuses
                self._history.add(finite_loss(loss, step), b, v)
        return self._history.loss[-1] if self._history.loss else math.nan

    def _global(self, losses: torch.Tensor, t: torch.Tensor, per_sample: torch.Tensor):
        """The global batch's mean loss of each step (equal shards: the mean of the ranks' means),
        and its (t, per-sample loss) in rank order: (k,), (k, B), (k, B)."""
        total = losses.clone()
        dist.all_reduce(total)                                     # SUM (gloo has no AVG)
        pairs = torch.stack([t.float(), per_sample])               # (2, k, b)
        parts = [torch.empty_like(pairs) for _ in range(self.world)]
        dist.all_gather(parts, pairs)
        both = torch.cat(parts, dim=2)                             # (2, k, B)
        return total / self.world, both[0].long(), both[1]

    def fit(self, steps: int | None = None, progress: bool = True, callback=None,
            checkpoint_path=None, checkpoint_every: int = 0) -> History:
        """Train until ``steps`` total steps (default ``cfg.steps``), saving to ``checkpoint_path``
        every ``checkpoint_every`` steps (0: only at the end) and at the end; ``callback(trainer)``
        runs at the same moments (e.g. to plot). Nothing is saved when no step ran. The loss is
        read back every LOG_EVERY steps (the progress bar shows it) and before every save.

        Ctrl-C (KeyboardInterrupt) saves a resumable checkpoint first, then re-raises.
        With several processes, rank 0 alone saves, shows progress and runs ``callback``; a
        failure on any rank (a peer died, a collective broke, SIGTERM) raises
        distributed.PeerFailure naming the last complete checkpoint to resume from.
        """
        steps = self.cfg.steps if steps is None else steps
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0: only at the end), got {checkpoint_every}")
        first, start = self.step, time.perf_counter()
        bar = tqdm(desc="training", disable=not progress or not distributed.is_main(), initial=self.step,
                   total=steps, mininterval=2.0)
        with self._ending(bar, first, start, checkpoint_path):
            while self.step < steps:
                self.train_step()
                bar.update()
                if self.step % LOG_EVERY == 0 or self.step == steps:
                    bar.set_postfix(loss=f"{self.read_back():.4f}", refresh=False)
                if checkpoint_every and self.step % checkpoint_every == 0:
                    self._save_point(checkpoint_path, callback)
        self._save_point(checkpoint_path if self.step > first else None, callback)
        return self.history

    @contextlib.contextmanager
    def _ending(self, bar, first: int, start: float, checkpoint_path):
        """How :meth:`fit`'s loop ends: the bar closed and the time added; on Ctrl-C a resumable
        checkpoint saved before the interrupt goes on; with several processes, any other failure
        becomes distributed.PeerFailure (:meth:`_stopped`)."""
        try:
            with distributed.sigterm_raises() if self.world > 1 else contextlib.nullcontext():
                yield
        except KeyboardInterrupt:
            self._stop_clock(bar, start)
            # (with several processes no collective can run now: the history keeps what was read back)
            if checkpoint_path and self.step > first and distributed.is_main():
                self.save(checkpoint_path)
                print(f"interrupted at step {self.step}: saved a resumable checkpoint to {checkpoint_path}")
            raise
        except Exception as err:
            bar.close()
            if self.world == 1 or isinstance(err, FloatingPointError):   # every rank raised the same
                raise
            raise self._stopped(err) from err
        finally:
            self.source.close()                          # stop the loader's workers
        self._stop_clock(bar, start)

    def _stop_clock(self, bar, start: float) -> None:
        bar.close()
        self._history.seconds += time.perf_counter() - start

    def _save_point(self, checkpoint_path, callback) -> None:
        """A checkpoint (when a path is given), then ``callback`` (rank 0)."""
        if checkpoint_path:
            self._checkpoint(checkpoint_path)
        if callback and distributed.is_main():
            callback(self)

    def _checkpoint(self, path) -> None:
        """Every rank reads the loss back (the history up to this step; no NaN run saved), rank 0
        saves (atomically); then every rank waits for it, so all know the last good file
        (rank 0 knows as soon as its save returns, even if a peer dies at the barrier)."""
        self.read_back()
        if distributed.is_main():
            self.save(path)
            self.last_checkpoint = (Path(path), self.step)
        distributed.barrier()
        self.last_checkpoint = (Path(path), self.step)

    def _stopped(self, err: BaseException) -> distributed.PeerFailure:
        """One line for a rank that cannot go on: what happened, and the checkpoint to resume from."""
        try:      # this rank is going down: a SIGTERM from torchrun must not cut its message short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except ValueError:                               # not the main thread
            pass
        text = " ".join(str(err).split()) or type(err).__name__
        collective = isinstance(err, (distributed.PeerFailure, dist.DistError)) or any(
            word in text for word in ("gloo", "NCCL", "Connection", "connection", "peer"))
        what = (f"another process of the job stopped or lost its connection ({text[:200]})" if collective
                else f"{type(err).__name__}: {text[:300]}")
        if self.last_checkpoint:
            path, step = self.last_checkpoint
            where = f"the last checkpoint is {path} (step {step}); resume from it with --resume {path}"
        else:
            where = "no checkpoint was written yet in this run (lower --save-every to save more often)"
        return distributed.PeerFailure(f"rank {self.rank} of {self.world} stopped at step {self.step}: {what}; "
                                       + where)

    def state(self, include_optimizer: bool = True) -> dict:
        model_cfg = self.model.config
        state = {
            "config": {"model": dataclasses.asdict(model_cfg),
                       "diffusion": dataclasses.asdict(self.diffusion_cfg),
                       "train": dataclasses.asdict(self.cfg)},
            "step": self.step,
            "ema": self.ema.module.state_dict(),
            "history": dataclasses.asdict(self.history),
            **self.meta,
        }
        if include_optimizer:
            state["model"] = self.model.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def save(self, path, include_optimizer: bool = True):
        """Write a checkpoint (atomically); with several processes only rank 0 writes (None elsewhere)."""
        if not distributed.is_main():
            return None
        if self.diverged_at is not None:
            raise FloatingPointError(f"not saved to {path}: the training loss became NaN or inf at step "
                                     f"{self.diverged_at} and the weights have changed since; resume from "
                                     "the last checkpoint with a lower learning rate")
        return save_checkpoint(path, self.state(include_optimizer))

    def resume(self, path, ckpt: dict | None = None) -> "Trainer":
        """Continue from a checkpoint written by :meth:`save` (model config must match);
        ``ckpt``: its contents when already read (:func:`resume_trainer`)."""
        ckpt = load_checkpoint(path, map_location=self.device) if ckpt is None else ckpt
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
        self.last_checkpoint, self.diverged_at = (Path(path), self.step), None
        self.source.close()                              # a stream restarts at the resumed step
        return self


def build_trainer(preset: Preset, data=None, device=None,
                  model: ModelConfig | None = None, train: TrainConfig | None = None,
                  labels: torch.Tensor | None = None, loader_workers: int = 2) -> Trainer:
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
    trainer = Trainer(net, data, train, preset.diffusion, device,
                      labels=labels if model.num_classes else None, loader_workers=loader_workers)
    trainer.meta["preset"] = preset.name               # written into every checkpoint of the run
    return trainer


def resume_trainer(path, data, steps: int, device=None, labels: torch.Tensor | None = None,
                   loader_workers: int = 2, precision: str | None = None, ckpt: dict | None = None) -> Trainer:
    """Continue the run saved at ``path`` to ``steps`` steps in total: the network, diffusion
    and recipe it was started with (only ``steps``, and ``precision`` on a GPU, may change),
    its weights, EMA, optimiser state and history, its preset's name and class names.
    ``ckpt``: the checkpoint's contents when the caller has read them (it is read once)."""
    from .unet import UNet
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    if "optimizer" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} holds no optimiser state (an exported checkpoint): it can be sampled from "
                         "but not resumed; resume the training checkpoint it was exported from")
    if steps <= ckpt["step"]:
        raise ValueError(f"{path} has already trained {ckpt['step']} steps; pass --steps N with "
                         f"N > {ckpt['step']} to train further")
    model_cfg, diffusion_cfg, train_cfg = configs_from_checkpoint(ckpt, path)
    train_cfg = dataclasses.replace(train_cfg, steps=steps, precision=precision or train_cfg.precision)
    with torch.random.fork_rng(devices=[]):      # the weights are overwritten: leave the global RNG alone
        net = UNet(model_cfg, T=diffusion_cfg.T)
    trainer = Trainer(net, data, train_cfg, diffusion_cfg, device,
                      labels=labels if model_cfg.num_classes else None, loader_workers=loader_workers)
    trainer.meta = {k: ckpt[k] for k in ("preset", "classes") if k in ckpt}
    return trainer.resume(path, ckpt)
