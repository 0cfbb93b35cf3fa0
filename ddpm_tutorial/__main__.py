"""Command line: train, sample and export outside the notebooks.

    python -m ddpm_tutorial train --preset cpu --out runs/cpu.pt
    python -m ddpm_tutorial train --resume runs/cpu.pt --steps 6000
    python -m ddpm_tutorial train --preset cifar --images my_photos/ --out runs/mine.pt
    torchrun --nproc_per_node=8 -m ddpm_tutorial train --preset cifar --images my_photos/ --out runs/mine.pt
    python -m ddpm_tutorial sample --checkpoint runs/cpu.pt --n 32 --png grid.png --tensor samples.pt
    python -m ddpm_tutorial export --checkpoint runs/cpu.pt --out my_model.pt

Every argument is checked before any long work starts, and every output before anything is
written (ddpm_tutorial/outputs.py: no input is ever overwritten, no existing file without
--force). An error is one line saying what was wrong and what to do; the exit code is 1
(2 for a usage error, 130 after Ctrl-C, 143 after SIGTERM). Ctrl-C and SIGTERM during
training save a resumable checkpoint first and print the command that resumes it.
Under torchrun every process runs this same command; rank 0 alone prints and saves.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
from pathlib import Path

try:                    # importing torch takes seconds: a Ctrl-C then is an answer, not a traceback
    import torch

    from .config import PRESETS, default_device, preset_name
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143     # 128 + the signal's number, as a shell reports it
FASHION_SHAPE = (1, 28)                          # (channels, pixels) of Fashion-MNIST


class Terminated(KeyboardInterrupt):
    """SIGTERM, which SLURM, Docker, systemd and a recycled Colab runtime send to stop a job.
    A KeyboardInterrupt, so the trainer's Ctrl-C path (save, then stop) handles it as Ctrl-C."""


class _Signals:
    """Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt / :class:`Terminated` in the main
    thread. Counts them and records the state of ``watch`` (the checkpoint) at the first, so a
    second signal during the save that the first one started can be reported truthfully.
    A signal a parent process set to be ignored (``nohup``, a background job) stays ignored."""

    def __init__(self):
        self.count, self.first, self.watch, self.watch_state = 0, None, None, None
        self._previous = {}

    def install(self) -> None:
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            try:
                if signal.getsignal(sig) is default:
                    self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:                     # not the main thread: signals stay as they are
                return

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def ignore(self) -> None:
        """Exiting now: one more Ctrl-C must not print a traceback over the last message."""
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            self.first, self.watch_state = signum, _file_state(self.watch)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def exit_code(self, err: BaseException) -> int:
        return EXIT_TERMINATED if isinstance(err, Terminated) or self.first == signal.SIGTERM else EXIT_INTERRUPTED


def _file_state(path) -> tuple | None:
    """(inode, mtime) of ``path``: it changes when a save renames a new file over it."""
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return None
    return st.st_ino, st.st_mtime_ns


# --- train ------------------------------------------------------------------------------------

def _check_image_args(args) -> None:
    """The own-images options, checked before anything is read."""
    if args.images is None:
        given = [flag for flag, value in (("--image-size", args.image_size), ("--channels", args.channels),
                                          ("--stream", args.stream or None)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to your own images: "
                             "add --images DIR")
        return
    if args.data:
        raise ValueError("--images (your own folder) and --data (Fashion-MNIST files) exclude each other; "
                         "give one of them")
    if not Path(args.images).is_dir():
        raise ValueError(f"--images {args.images}: {'is a file' if Path(args.images).exists() else 'does not exist'}"
                         "; give a folder of .png / .jpg images (any depth of subfolders)")
    if args.image_size is not None and args.image_size < 8:
        raise ValueError(f"--image-size must be at least 8 pixels (28, 32 and 64 are usual), got {args.image_size}")
    if args.subset:
        raise ValueError("--subset applies to Fashion-MNIST; with --images, put the images you want in the folder")
    if args.resume and args.image_size is not None:
        raise ValueError("--image-size cannot change on --resume: the model was built for its size")


def _check_workers(workers: int) -> None:
    cores = os.cpu_count() or 1
    if workers > 4 * cores:
        raise ValueError(f"--workers {workers} is more than 4 per CPU core of this machine ({cores} cores): "
                         f"at most {4 * cores}; 0 to {cores} are usual (0: the main process decodes)")


def _resumed(args, overrides: dict):
    """(checkpoint, preset, train config) of a resumed run: the checkpoint is read once, here,
    and its own configs win over the preset's; only --steps (and --precision) may change."""
    from .checkpoint import configs_from_checkpoint, load_checkpoint
    from .config import get_preset
    if args.preset:
        raise ValueError(f"--preset {args.preset} cannot be combined with --resume: a resumed run keeps "
                         "the settings it was started with (change only --steps)")
    changed = sorted(set(overrides) - {"steps", "precision"})
    if changed:
        raise ValueError(f"--resume continues a run with its own settings; only --steps may change, not "
                         f"{', '.join('--' + k.replace('_', '-') for k in changed)} (and --precision on a GPU)")
    if args.conditional:
        raise ValueError("--conditional cannot be combined with --resume: a resumed run keeps the model "
                         "it was started with")
    ckpt = load_checkpoint(args.resume)
    if "optimizer" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{args.resume} holds no optimiser state (an exported checkpoint): it can be "
                         "sampled from but not resumed; resume the training checkpoint it was exported from")
    model_cfg, diffusion_cfg, train_cfg = configs_from_checkpoint(ckpt, args.resume)
    train_cfg = dataclasses.replace(train_cfg, **overrides)
    if train_cfg.steps <= ckpt["step"]:
        raise ValueError(f"{args.resume} has already trained {ckpt['step']} steps; pass --steps N with "
                         f"N > {ckpt['step']} to train further")
    if not args.images and (model_cfg.in_channels, model_cfg.image_size) != FASHION_SHAPE:
        raise ValueError(f"{args.resume} was trained on your own {model_cfg.in_channels}-channel "
                         f"{model_cfg.image_size}px images, not Fashion-MNIST: pass --images DIR, the folder it "
                         "was trained on")
    name = ckpt.get("preset") or "unknown"
    preset = dataclasses.replace(get_preset(name if name in PRESETS else None), name=name, model=model_cfg,
                                 diffusion=diffusion_cfg, train=train_cfg)
    return ckpt, preset, train_cfg


def _new_run(args, overrides: dict):
    """(None, preset, train config) of a new run: the preset's settings and the flags given."""
    from .config import get_preset
    preset = get_preset(args.preset)
    if args.conditional and not args.images:          # --images: the folder's classes decide
        from .data import CLASSES
        preset = dataclasses.replace(preset, model=dataclasses.replace(preset.model, num_classes=len(CLASSES)))
    return None, preset, dataclasses.replace(preset.train, **overrides)      # validated by TrainConfig


def _load_images(args, preset, main: bool):
    """(data, labels, class names, model config) for --images: the preset's network at the
    folder's size and channels (a resumed run's own)."""
    from .image_folder import ImageFolder, folder_data
    log = print if main else (lambda *a, **k: None)
    size = args.image_size or preset.model.image_size
    channels = args.channels or (preset.model.in_channels if args.resume else None)
    folder = ImageFolder(args.images, size, channels, log=log)
    if args.resume and channels == 3 and not folder.colour:
        raise ValueError(f"{args.resume} is a colour model, but every image in {args.images} is greyscale: "
                         "resume it on the colour images it was trained on, or start a grey run (--channels 1)")
    data, labels = folder_data(folder, in_memory=False if args.stream else None, workers=args.workers, log=log)
    model = dataclasses.replace(preset.model, in_channels=folder.channels, image_size=size)
    if args.conditional and not args.resume:
        if labels is None:
            raise ValueError(f"--conditional needs classes: the folder layout {args.images}/<class>/<images> "
                             "(torchvision's ImageFolder), with every image in a class subfolder")
        model = dataclasses.replace(model, num_classes=len(folder.classes))
    if args.resume and model != preset.model:
        raise ValueError(f"{args.resume} was trained on {preset.model.in_channels}-channel {preset.model.image_size}px "
                         f"images; --images gives {folder.channels}-channel {size}px ones")
    return data, labels, folder.classes, model


def _train(args) -> None:
    from . import distributed
    from .runinfo import hardware_summary
    from .train import build_trainer, resume_trainer

    ckpt, preset, train_cfg, out = _preflight(args)    # 1. every check that needs no data
    args.signals.watch = out
    ctx = distributed.init(log=lambda line: print(line, file=sys.stderr, flush=True))
    try:
        say = print if ctx.rank == 0 else (lambda *a, **k: None)
        say(f"preset {preset.name}" + (f" (resumed from {args.resume} at step {ckpt['step']})" if ckpt else "")
            + f" on {hardware_summary(ctx.device)}"
            + (f", {ctx.world_size} processes ({ctx.backend}), {train_cfg.batch_size // ctx.world_size} images "
               f"each of a global batch of {train_cfg.batch_size}" if ctx.world_size > 1 else "")
            + f"; checkpoint -> {out}")
        with distributed.local_main_first():      # 2. the data (one process per machine fills the cache first)
            data, labels, classes, preset = _training_data(args, preset, ckpt, train_cfg, ctx.rank == 0)
        labels = labels if preset.model.num_classes else None
        if ckpt:                                    # 3. the trainer: resumed, or new from the preset
            trainer = resume_trainer(args.resume, data, train_cfg.steps, device=ctx.device, labels=labels,
                                     loader_workers=args.workers, precision=args.precision, ckpt=ckpt)
        else:
            trainer = build_trainer(preset, data, device=ctx.device, train=train_cfg, loader_workers=args.workers,
                                    labels=labels)
        named = preset.model.num_classes and len(classes) == preset.model.num_classes
        trainer.meta = {"preset": preset.name, **({"classes": list(classes)} if named else {})}
        _fit(trainer, args, out, say, resumed_here=ckpt is not None and _same_path(args.resume, out))   # 4. train
    finally:
        distributed.cleanup()


def _same_path(a, b) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _preflight(args):
    """(checkpoint or None, preset, train config, out) after every check that reads no data:
    the flags, the checkpoint to resume (read once), --out, the global batch, the memory."""
    from . import distributed
    from .outputs import check_outputs
    from .train import check_global_batch
    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed", "subset", "precision")
                 if getattr(args, k) is not None}
    if args.flip:
        overrides["hflip"] = True
    _check_image_args(args)
    _check_workers(args.workers)
    world = distributed.world_size_from_env()
    ckpt, preset, train_cfg = _resumed(args, overrides) if args.resume else _new_run(args, overrides)
    out = Path(args.out or args.resume or f"runs/{preset.name}.pt")
    in_place = bool(args.resume) and _same_path(args.resume, out)
    check_outputs({"--out": out}, inputs={"--resume": None if in_place else args.resume},
                  force=args.force or in_place, examples={"--out": "model.pt"},
                  sizes={"--out": _checkpoint_bytes(preset.model)},
                  exists_hint=f"pass --force to overwrite it, --resume {out} to continue training it, "
                              "or choose another --out")
    check_global_batch(train_cfg.batch_size, world)
    model_cfg = preset.model if not args.images or args.resume else dataclasses.replace(
        preset.model, image_size=args.image_size or preset.model.image_size, in_channels=args.channels or 3)
    _check_memory(lambda b: _training_bytes(model_cfg, b // world), train_cfg.batch_size, "--batch-size",
                  f"train at {model_cfg.image_size}x{model_cfg.image_size} px", "a smaller --image-size")
    return ckpt, preset, train_cfg, out


def _training_data(args, preset, ckpt, train_cfg, main: bool):
    """(data, labels, class names, preset with the data's model) for this run: your --images,
    or Fashion-MNIST; a resumed run's class names must be the folder's."""
    from .data import CLASSES, load_fashion_mnist
    classes = ckpt.get("classes") if ckpt else None
    if args.images:
        data, labels, folder_classes, model_cfg = _load_images(args, preset, main)
        preset = dataclasses.replace(preset, model=model_cfg)
        if classes and model_cfg.num_classes and tuple(folder_classes) != tuple(classes):
            raise ValueError(f"{args.resume} was trained on the classes {', '.join(classes)}; the subfolders of "
                             f"{args.images} are {', '.join(folder_classes) or 'none'}: resume on the folder it "
                             "was trained on")
        classes = classes or folder_classes
    else:
        data, labels = load_fashion_mnist(train=True, subset=train_cfg.subset, root=args.data)
        classes = classes or CLASSES
    if len(data) < train_cfg.batch_size:
        raise ValueError(f"--batch-size {train_cfg.batch_size} is larger than the {len(data)} training images: "
                         f"give --batch-size {len(data)} or less, or more images")
    return data, labels, classes, preset


def _fit(trainer, args, out: Path, say, resumed_here: bool) -> None:
    """Train, and on Ctrl-C / SIGTERM / a full disk say exactly what was kept and how to resume."""
    from .image_folder import ImageFolderError
    from .outputs import DiskFullError
    start = trainer.step
    saved = [start] if resumed_here else []              # steps the file at `out` is known to hold
    data_arg = (f" --data {shlex.quote(args.data)}" if args.data else "") + \
        (f" --images {shlex.quote(args.images)}" if args.images else "")
    resume = f"python -m ddpm_tutorial train --resume {shlex.quote(str(out))}{data_arg}"
    try:
        trainer.fit(checkpoint_path=out, checkpoint_every=args.save_every,
                    callback=lambda tr: saved.append(tr.step) if args.save_every else None)
    except KeyboardInterrupt:
        signals = args.signals
        if signals.count > 1 and _file_state(out) == signals.watch_state:   # the save was cut short
            kept = (f"{out} still holds step {saved[-1]}; resume with: {resume}" if saved else
                    "nothing was saved in this run")
            say(f"interrupted again while saving: the save was abandoned (no half-written file); {kept}",
                file=sys.stderr)
        elif trainer.step > start or saved:            # fit saved the step reached, or nothing new
            say(f"resume with: {resume}", file=sys.stderr)
        raise
    except DiskFullError as err:
        kept = (f"free some space, then resume with: {resume}" if saved else
                "nothing was saved in this run: free some space and run the command again")
        raise DiskFullError(f"{err}; {kept}") from err
    except ImageFolderError as err:     # an image that fails to decode while streaming (--stream)
        last = [line for line in str(err).splitlines() if line.strip()][-1]   # a loader worker's: its last line
        kept = f"then resume with: {resume}" if saved else "nothing was saved in this run: then run the command again"
        raise ImageFolderError(f"{last.split('ImageFolderError: ')[-1]}; {kept}") from None
    say(f"done: {trainer.step} steps, final loss {trainer.history.loss[-1]:.4f}, "
        f"{trainer.history.seconds:.0f} s this run; checkpoint {out}")


# --- memory and disk estimates ------------------------------------------------------------------

def _feature_floats(cfg) -> float:
    """Floats of one image's feature maps, one per resolution level: sum_l width_l (S / 2^l)^2,
    plus the attention matrix (HW)^2 at the lowest level when the network has attention."""
    floats = sum(w * (cfg.image_size / 2 ** level) ** 2 for level, w in enumerate(cfg.widths))
    if cfg.attention:
        floats += (cfg.image_size / 2 ** (len(cfg.widths) - 1)) ** 4
    return floats


def _parameter_count(cfg) -> int:
    from .unet import UNet
    with torch.device("meta"):                     # shapes only: nothing is allocated
        return sum(p.numel() for p in UNet(cfg).parameters())


def _checkpoint_bytes(cfg) -> int:
    """A training checkpoint: weights, EMA and Adam's two moments in float32."""
    return 4 * 4 * _parameter_count(cfg)


# Measured peaks per image divided by 4 * _feature_floats (float32): 31-47 with a backward
# pass (quick, cpu, cifar presets at 32 px), 9-15 sampling without gradients.
TRAIN_FEATURE_COPIES, SAMPLE_FEATURE_COPIES = 16, 12


def _training_bytes(cfg, batch: int) -> int:
    """About the memory one process needs to train: weights, gradients, EMA and Adam
    (5 float32 copies of the parameters) and the activations a backward pass keeps."""
    return int(5 * 4 * _parameter_count(cfg)
               + batch * 4 * _feature_floats(cfg) * TRAIN_FEATURE_COPIES * (cfg.num_res_blocks + 1))


def _sampling_bytes(cfg, n: int) -> int:
    return int(4 * _parameter_count(cfg) + n * 4 * _feature_floats(cfg) * SAMPLE_FEATURE_COPIES)


def available_memory(device) -> int | None:
    """Bytes free on ``device``: the GPU's free memory, or the machine's available memory
    (MemAvailable of /proc/meminfo); None when it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(need_for, count: int, flag: str, what: str, too_large: str, device=None, hint: str = "") -> None:
    """Refuse, before any allocation, a ``count`` (``flag``'s value: images at once) whose memory
    ``need_for(count)`` exceeds what ``device`` has free; say the largest count that fits."""
    from .outputs import size_text
    device = device or default_device()
    free, need = available_memory(device), need_for(count)
    if free is None or need <= free:
        return
    per_image, fixed = need_for(1) - need_for(0), need_for(0)
    most = int((free - fixed) // per_image) if per_image > 0 else 0
    where = "the GPU has" if torch.device(device).type == "cuda" else "this machine has"
    fix = f"{flag} {most} or less" if most >= 1 else too_large
    raise MemoryError(f"{flag} {count} needs about {size_text(need)} of memory to {what}, {where} "
                      f"{size_text(free)} available: use {fix}{hint}")


# --- sample -----------------------------------------------------------------------------------

def _sample(args) -> None:
    from .checkpoint import model_from_checkpoint, shipped_checkpoint_path
    from .outputs import check_outputs, torch_save, what_is_left, write_file
    from .sampling import check_samples, ddim_sample, ddpm_sample
    import matplotlib.pyplot as plt

    from .viz import check_image_extension, grid_array

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if not 0.0 <= args.guidance < float("inf"):
        raise ValueError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if not (0.0 <= args.eta <= 1.0):
        raise ValueError(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {args.eta}")
    if args.eta and not args.ddim_steps:
        raise ValueError(f"--eta {args.eta} applies to DDIM only: add --ddim-steps N (full DDPM has no eta)")
    if args.guidance and args.class_name is None:
        raise ValueError("--guidance needs --class (the class to guide towards)")
    if not args.png and not args.tensor:
        args.png = "samples.png"
    device = default_device()
    checkpoint = args.checkpoint or shipped_checkpoint_path()
    model, schedule, ckpt = model_from_checkpoint(checkpoint, device=device)
    cfg = model.config
    if args.ddim_steps > schedule.T:
        raise ValueError(f"--ddim-steps must be at most the checkpoint's T = {schedule.T}, got {args.ddim_steps}")
    y = class_index(args.class_name, checkpoint_classes(ckpt)) if args.class_name is not None else None
    _check_memory(lambda n: _sampling_bytes(cfg, n * (2 if args.guidance else 1)), args.n, "--n",
                  "sample at once", "a smaller network: even one image does not fit", device,
                  hint=" (runs with different --seed give more images)")
    pixels = args.n * cfg.in_channels * cfg.image_size ** 2
    check_outputs({"--png": args.png, "--tensor": args.tensor}, inputs={"--checkpoint": checkpoint},
                  force=args.force, examples={"--png": "samples.png", "--tensor": "samples.pt"},
                  sizes={"--png": 4 * pixels, "--tensor": 4 * pixels})   # a PNG is at most 4 bytes a pixel
    if args.png:
        check_image_extension(args.png)
    if args.ddim_steps:
        result = ddim_sample(model, schedule, n=args.n, steps=args.ddim_steps, eta=args.eta, seed=args.seed,
                             y=y, guidance=args.guidance)
    else:
        result = ddpm_sample(model, schedule, n=args.n, seed=args.seed, y=y, guidance=args.guidance)
    check_samples(result)                               # NaN or far outside [-1, 1]: nothing is written
    def left(path, written: str | None = None) -> str:
        """What a full disk leaves, for its one line: the file --force would have replaced, and
        the file this command wrote before."""
        done = f" ({written} written)" if written else ""
        return (f"{what_is_left(path, f'{path} was not written')}{done}; free some space, or choose another path, "
                "and sample again (the same --seed gives the same images)")

    if args.png:
        image = grid_array(result.images)         # grey or RGB, one image pixel = one PNG pixel
        write_file(args.png, lambda f: plt.imsave(f, image, cmap="gray", vmin=0, vmax=1,
                                                  format=Path(args.png).suffix[1:].lower()),
                   need=4 * pixels, left=left(args.png))
        print(f"wrote {args.png}")
    if args.tensor:
        torch_save(result.images, args.tensor, left=left(args.tensor, written=args.png))
        print(f"wrote {args.tensor}: tensor {tuple(result.images.shape)} in [-1, 1]")


def checkpoint_classes(ckpt: dict) -> tuple:
    """A conditional checkpoint's class names, index = label: those it saved, else (written
    before names were kept) Fashion-MNIST's when it has their number of classes, else none."""
    from .data import CLASSES
    num_classes = ckpt["config"]["model"].get("num_classes", 0)
    if ckpt.get("classes"):
        return tuple(ckpt["classes"])
    return CLASSES if num_classes == len(CLASSES) else ()


def class_index(name: str, classes=None) -> int:
    """A class by index or by name, case-insensitive ("sneaker", "ankle boot", "t-shirt"):
    ``classes`` are the checkpoint's class names (default Fashion-MNIST's)."""
    from .data import CLASSES
    classes = CLASSES if classes is None else tuple(classes)
    if not classes:
        raise ValueError("this checkpoint has no class embedding (an unconditional model): drop --class, "
                         "or train a conditional one with `python -m ddpm_tutorial train --conditional`")
    if name.strip().isdigit() and int(name) < len(classes):
        return int(name)
    wanted = name.strip().lower().replace("_", " ")
    for i, c in enumerate(classes):
        if wanted in (c.lower(), c.lower().replace("_", " "), *c.lower().split("/")):
            return i
    listed = ", ".join(c.lower() for c in classes[:20]) + (", ..." if len(classes) > 20 else "")
    raise ValueError(f"unknown class {name!r}; expected an index 0-{len(classes) - 1} or one of: {listed}")


# --- export -----------------------------------------------------------------------------------

def _export(args) -> None:
    """A small checkpoint for sampling only: EMA weights and configs, no optimiser state."""
    from .checkpoint import export_for_sampling
    from .outputs import check_outputs
    check_outputs({"--out": args.out}, inputs={"--checkpoint": args.checkpoint}, force=args.force,
                  examples={"--out": "model.pt"})
    path, size = export_for_sampling(args.checkpoint, args.out)
    print(f"wrote {path} ({size / 1e6:.2f} MB: EMA weights and configs, no optimiser state)")


# --- the parser -------------------------------------------------------------------------------

def _positive_or_zero(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what was wrong, where the help is), exit code 2.
    Sub-command parsers are made with this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import export as onnx_export
    parser = _Parser(prog="python -m ddpm_tutorial", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a DDPM on Fashion-MNIST or your own images (torchrun: many GPUs)")
    t.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help=f"default: {preset_name()} (DDPM_QUICK=1 forces quick)")
    t.add_argument("--out", help="checkpoint path (default runs/<preset>.pt)")
    t.add_argument("--force", action="store_true", help="overwrite an existing checkpoint at --out")
    t.add_argument("--resume", help="continue from this checkpoint (and write back to it)")
    t.add_argument("--steps", type=int, help="total optimiser steps")
    t.add_argument("--batch-size", dest="batch_size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--subset", type=int, help="use only the first N training images")
    t.add_argument("--conditional", action="store_true",
                   help="class-conditional model (labels dropped with p_uncond) for classifier-free guidance")
    t.add_argument("--data", help="folder with the Fashion-MNIST files (else DDPM_DATA_DIR, Debian, download)")
    t.add_argument("--save-every", type=_positive_or_zero, default=500,
                   help="checkpoint every N steps (0: only at the end)")
    t.add_argument("--images", help="train on your own images: a folder of .png / .jpg (searched recursively; "
                   "root/<class>/ subfolders give classes for --conditional)")
    t.add_argument("--image-size", dest="image_size", type=int, help="with --images: pixels of the square the "
                   "images are resized and center-cropped to (28, 32, 64; default: the preset's)")
    t.add_argument("--channels", type=int, choices=(1, 3), help="with --images: 1 grey, 3 RGB "
                   "(default: 3 if any image is colour)")
    t.add_argument("--flip", action="store_true", help="mirror each training image left-right with probability 1/2")
    t.add_argument("--stream", action="store_true", help="with --images: read from disk every step even when "
                   "the images would fit in memory")
    t.add_argument("--workers", type=_positive_or_zero, default=2,
                   help="processes decoding images ahead when streaming --images (default 2)")
    t.add_argument("--precision", choices=("fp16", "bf16", "fp32"),
                   help="autocast on CUDA (default: the preset's); on the CPU the preset's cpu_precision applies")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="sample images from a checkpoint")
    s.add_argument("--checkpoint", default=None, help="default: the checkpoint shipped with the package")
    s.add_argument("--n", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ddim-steps", type=_positive_or_zero, default=0,
                   help="0: full DDPM (T steps); else DDIM with this many")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM noise, in [0, 1]")
    s.add_argument("--class", dest="class_name", default=None,
                   help="class to generate, by name or index (a conditional checkpoint knows its class names)")
    s.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale w >= 0")
    s.add_argument("--png", help="write an image grid here (.png, .jpg, .pdf, .svg)")
    s.add_argument("--tensor", help="write the (N, C, H, W) tensor in [-1, 1] here (torch.save)")
    s.add_argument("--force", action="store_true", help="overwrite existing files at --png / --tensor")
    s.set_defaults(func=_sample)

    e = sub.add_parser("export", help="write a small sampling-only checkpoint (EMA weights + configs)")
    e.add_argument("--checkpoint", required=True, help="a training checkpoint, e.g. runs/cpu.pt")
    e.add_argument("--out", required=True, help="where to write it (e.g. the package's assets/ to ship it)")
    e.add_argument("--force", action="store_true", help="overwrite an existing file at --out")
    e.set_defaults(func=_export)

    onnx_export.add_parser(sub)        # export-onnx: the browser demo's network and schedule
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.signals = signals = _Signals()
    signals.install()
    try:
        args.func(args)
    except KeyboardInterrupt as err:
        signals.ignore()
        code = signals.exit_code(err)
        print("terminated (SIGTERM)" if code == EXIT_TERMINATED else "interrupted", file=sys.stderr)
        return code
    except (ValueError, TypeError, RuntimeError, OSError, MemoryError, FloatingPointError,
            ZeroDivisionError) as err:
        print(f"error: {_where(_one_line(err))}", file=sys.stderr, flush=True)
        return 1
    except Exception as err:       # a bug of ours: still one line, the traceback on request
        if os.environ.get("DDPM_TRACEBACK"):
            raise
        print(f"error: unexpected {type(err).__name__}: {_one_line(err)} (likely a bug; rerun with "
              "DDPM_TRACEBACK=1 to see the traceback, and please report it)", file=sys.stderr)
        return 1
    finally:
        signals.restore()
    return 0


def _where(message: str) -> str:
    """Under torchrun, say which process an error comes from (every rank prints its own)."""
    from .distributed import env_int
    try:
        world, rank = env_int("WORLD_SIZE", 1, lo=1), env_int("RANK", 0)
    except ValueError:                           # the bad variable is what the message is about
        return message
    if world > 1 and not message.startswith("rank "):
        return f"rank {rank} of {world}: {message}"
    return message


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror and not err.filename:
        text = err.strerror                # OSError(errno, message): the message alone, no "[Errno 28]"
    else:
        text = str(err)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
