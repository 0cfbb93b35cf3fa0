"""Command line: train, sample and export outside the notebooks.

    python -m ddpm_tutorial train --preset cpu --out runs/cpu.pt
    python -m ddpm_tutorial train --resume runs/cpu.pt --steps 6000
    python -m ddpm_tutorial train --preset cifar --images my_photos/ --out runs/mine.pt
    torchrun --nproc_per_node=8 -m ddpm_tutorial train --preset cifar --images my_photos/ --out runs/mine.pt
    python -m ddpm_tutorial sample --checkpoint runs/cpu.pt --n 32 --png grid.png --tensor samples.pt
    python -m ddpm_tutorial export --checkpoint runs/cpu.pt --out my_model.pt

Every argument is checked before any long work starts; an error is one line saying what was
wrong and what to do, and the exit code is 1 (2 for a usage error, 130 after Ctrl-C).
Under torchrun every process runs this same command; rank 0 alone prints and saves.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path

try:                    # importing torch takes seconds: a Ctrl-C then is an answer, not a traceback
    import torch

    from .config import PRESETS, default_device, preset_name
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)


def _check_image_args(args) -> None:
    """The own-images options, checked before anything is read."""
    if args.images is None:
        given = [flag for flag, value in (("--image-size", args.image_size), ("--channels", args.channels),
                                          ("--stream", args.stream or None)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} apply to your own images: add --images DIR")
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


def _load_images(args, preset, main: bool):
    """(data, labels, model config) for --images: the preset's network at the folder's size and channels."""
    from .image_folder import load_image_folder
    size = args.image_size or preset.model.image_size
    channels = args.channels or (preset.model.in_channels if args.resume else None)
    data, labels = load_image_folder(args.images, size, channels, in_memory=False if args.stream else None,
                                     workers=args.workers, log=print if main else (lambda *a, **k: None))
    shape = data.shape[1:] if isinstance(data, torch.Tensor) else data.image_shape
    model = dataclasses.replace(preset.model, in_channels=shape[0], image_size=size)
    if args.conditional and not args.resume:
        if labels is None:
            raise ValueError(f"--conditional needs classes: the folder layout {args.images}/<class>/<images> "
                             "(torchvision's ImageFolder), with every image in a class subfolder")
        model = dataclasses.replace(model, num_classes=int(labels.max()) + 1)
    if args.resume and model != preset.model:
        raise ValueError(f"{args.resume} was trained on {preset.model.in_channels}-channel {preset.model.image_size}px "
                         f"images; --images gives {shape[0]}-channel {size}px ones")
    return data, labels, model


def _train(args) -> None:
    from . import distributed
    from .checkpoint import check_output_path, configs_from_checkpoint, load_checkpoint
    from .config import get_preset
    from .data import load_fashion_mnist
    from .runinfo import hardware_summary
    from .train import build_trainer, check_global_batch

    preset = get_preset(args.preset)
    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed", "subset", "precision")
                 if getattr(args, k) is not None}
    if args.flip:
        overrides["hflip"] = True
    _check_image_args(args)
    if args.resume:    # the checkpoint's own configs win over the preset's
        if args.preset:
            raise ValueError(f"--preset {args.preset} cannot be combined with --resume: a resumed run keeps "
                             "the settings it was started with (change only --steps)")
        if set(overrides) - {"steps", "precision"}:
            changed = sorted(set(overrides) - {"steps", "precision"})
            raise ValueError(f"--resume continues a run with its own settings; only --steps may change, not "
                             f"{', '.join('--' + k.replace('_', '-') for k in changed)} (and --precision on a GPU)")
        if args.conditional:
            raise ValueError("--conditional cannot be combined with --resume: a resumed run keeps the model "
                             "it was started with")
        ckpt = load_checkpoint(args.resume)
        if "optimizer" not in ckpt:
            raise ValueError(f"{args.resume} holds no optimiser state (an exported checkpoint): it can be "
                             "sampled from but not resumed; resume the training checkpoint it was exported from")
        model_cfg, diffusion_cfg, train_cfg = configs_from_checkpoint(ckpt)
        preset = dataclasses.replace(preset, name=f"{args.resume} (resumed)", model=model_cfg,
                                     diffusion=diffusion_cfg, train=train_cfg)
    if args.conditional and not args.resume:
        from .data import CLASSES
        preset = dataclasses.replace(preset, model=dataclasses.replace(preset.model, num_classes=len(CLASSES)))
    train_cfg = dataclasses.replace(preset.train, **overrides)      # validated by TrainConfig
    out = Path(args.out or args.resume or f"runs/{preset.name}.pt")
    check_output_path(out, overwrite=bool(args.force or (args.resume and out == Path(args.resume))))
    if args.resume and train_cfg.steps <= ckpt["step"]:
        raise ValueError(f"{args.resume} has already trained {ckpt['step']} steps; pass --steps N with "
                         f"N > {ckpt['step']} to train further")
    check_global_batch(train_cfg.batch_size, int(os.environ.get("WORLD_SIZE", "1") or 1))   # before any loading
    ctx = distributed.init()             # one process: nothing to join; under torchrun: the process group
    try:
        main = ctx.rank == 0
        say = print if main else (lambda *a, **k: None)
        say(f"preset {preset.name} on {hardware_summary(ctx.device)}"
            + (f", {ctx.world_size} processes ({ctx.backend}), {train_cfg.batch_size // ctx.world_size} images "
               f"each of a global batch of {train_cfg.batch_size}" if ctx.world_size > 1 else "")
            + f"; checkpoint -> {out}")
        with distributed.local_main_first():      # one process per machine fills the data cache first
            if args.images:
                data, labels, model_cfg = _load_images(args, preset, main)
                preset = dataclasses.replace(preset, model=model_cfg)
            else:
                data, labels = load_fashion_mnist(train=True, subset=train_cfg.subset, root=args.data)
        trainer = build_trainer(preset, data, device=ctx.device, train=train_cfg, loader_workers=args.workers,
                                labels=labels if preset.model.num_classes else None)
        if args.resume:
            trainer.resume(args.resume)
            trainer.cfg = train_cfg          # the same run, with a new number of total steps
            say(f"resumed at step {trainer.step}")
        _fit(trainer, args, out, say)
    finally:
        distributed.cleanup()


def _fit(trainer, args, out: Path, say) -> None:
    start = trainer.step
    try:
        trainer.fit(checkpoint_path=out, checkpoint_every=args.save_every)
    except KeyboardInterrupt:
        if trainer.step > start or (args.resume and out == Path(args.resume)):   # fit saved, or nothing new
            data_arg = (f" --data {shlex.quote(args.data)}" if args.data else "") + \
                (f" --images {shlex.quote(args.images)}" if args.images else "")
            say(f"resume with: python -m ddpm_tutorial train --resume {shlex.quote(str(out))}{data_arg}",
                file=sys.stderr)
        raise
    say(f"done: {trainer.step} steps, final loss {trainer.history.loss[-1]:.4f}, "
        f"{trainer.history.seconds:.0f} s this run; checkpoint {out}")


def _sample(args) -> None:
    from .checkpoint import check_output_path, model_from_checkpoint
    from .sampling import check_samples, ddim_sample, ddpm_sample
    from .viz import save_grid

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if not 0.0 <= args.guidance < float("inf"):
        raise ValueError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if not (0.0 <= args.eta <= 1.0):
        raise ValueError(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {args.eta}")
    if args.eta and not args.ddim_steps:
        raise ValueError(f"--eta {args.eta} applies to DDIM only: add --ddim-steps N (full DDPM has no eta)")
    y = class_index(args.class_name) if args.class_name is not None else None
    if y is None and args.guidance:
        raise ValueError("--guidance needs --class (the class to guide towards)")
    if not args.png and not args.tensor:
        args.png = "samples.png"
    for path, example in ((args.png, "samples.png"), (args.tensor, "samples.pt")):
        if path:
            check_output_path(Path(path), overwrite=True, example=example)
    if args.png:
        from .viz import check_image_extension
        check_image_extension(args.png)
    device = default_device()
    model, schedule, _ = model_from_checkpoint(args.checkpoint, device=device)
    if args.ddim_steps > schedule.T:
        raise ValueError(f"--ddim-steps must be at most the checkpoint's T = {schedule.T}, got {args.ddim_steps}")
    if y is not None and not model.config.num_classes:
        raise ValueError("this checkpoint has no class embedding (an unconditional model): drop --class, "
                         "or train a conditional one with `python -m ddpm_tutorial train --conditional`")
    if args.ddim_steps:
        result = ddim_sample(model, schedule, n=args.n, steps=args.ddim_steps, eta=args.eta, seed=args.seed,
                             y=y, guidance=args.guidance)
    else:
        result = ddpm_sample(model, schedule, n=args.n, seed=args.seed, y=y, guidance=args.guidance)
    check_samples(result)
    if args.png:
        save_grid(result.images, args.png)          # grey or RGB, one image pixel = one PNG pixel
        print(f"wrote {args.png}")
    if args.tensor:
        torch.save(result.images, args.tensor)
        print(f"wrote {args.tensor}: tensor {tuple(result.images.shape)} in [-1, 1]")


def class_index(name: str) -> int:
    """A Fashion-MNIST class by index (0-9) or name, case-insensitive ("sneaker", "ankle boot", "t-shirt")."""
    from .data import CLASSES
    if name.strip().isdigit() and int(name) < len(CLASSES):
        return int(name)
    wanted = name.strip().lower().replace("_", " ")
    for i, c in enumerate(CLASSES):
        if wanted in (c.lower(), *c.lower().split("/")):
            return i
    raise ValueError(f"unknown class {name!r}; expected an index 0-{len(CLASSES) - 1} or one of: "
                     + ", ".join(c.lower() for c in CLASSES))


def _export(args) -> None:
    """A small checkpoint for sampling only: EMA weights and configs, no optimiser state."""
    from .checkpoint import check_output_path, export_for_sampling
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"--out {args.out} is the --checkpoint itself: exporting over it would delete its "
                         "optimiser state; choose another --out")
    check_output_path(Path(args.out), overwrite=args.force,
                      exists_hint="pass --force to overwrite it, or choose another --out")
    path, size = export_for_sampling(args.checkpoint, args.out)
    print(f"wrote {path} ({size / 1e6:.2f} MB: EMA weights and configs, no optimiser state)")


def _positive_or_zero(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what was wrong, where the help is), exit code 2.
    Sub-command parsers are made with this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
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
                   help="autocast on CUDA (default: the preset's); the CPU always trains in fp32")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="sample images from a checkpoint")
    s.add_argument("--checkpoint", default=None, help="default: the checkpoint shipped with the package")
    s.add_argument("--n", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ddim-steps", type=_positive_or_zero, default=0,
                   help="0: full DDPM (T steps); else DDIM with this many")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM noise, in [0, 1]")
    s.add_argument("--class", dest="class_name", default=None,
                   help="class to generate, by name or index (a conditional checkpoint)")
    s.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale w >= 0")
    s.add_argument("--png", help="write an image grid here (.png, .jpg, .pdf, .svg)")
    s.add_argument("--tensor", help="write the (N, C, H, W) tensor in [-1, 1] here (torch.save)")
    s.set_defaults(func=_sample)

    e = sub.add_parser("export", help="write a small sampling-only checkpoint (EMA weights + configs)")
    e.add_argument("--checkpoint", required=True, help="a training checkpoint, e.g. runs/cpu.pt")
    e.add_argument("--out", required=True, help="where to write it (e.g. the package's assets/ to ship it)")
    e.add_argument("--force", action="store_true", help="overwrite an existing file at --out")
    e.set_defaults(func=_export)

    try:                              # the browser demo's exporter, where installed
        from . import export as onnx_export
        onnx_export.add_parser(sub)
    except ImportError:
        pass
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, OSError, FloatingPointError, ZeroDivisionError) as err:
        message = _one_line(err)
        world = os.environ.get("WORLD_SIZE", "1")
        if world not in ("", "1") and not message.startswith("rank "):   # under torchrun: say which process
            message = f"rank {os.environ.get('RANK', '?')} of {world}: {message}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1
    except Exception as err:       # a bug of ours: still one line, the traceback on request
        if os.environ.get("DDPM_TRACEBACK"):
            raise
        print(f"error: unexpected {type(err).__name__}: {_one_line(err)} (likely a bug; rerun with "
              "DDPM_TRACEBACK=1 to see the traceback, and please report it)", file=sys.stderr)
        return 1
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
