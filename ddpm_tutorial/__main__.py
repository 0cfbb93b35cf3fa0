"""Command line: train, sample and export outside the notebooks.

    python -m ddpm_tutorial train --preset cpu --out runs/cpu.pt
    python -m ddpm_tutorial train --resume runs/cpu.pt --steps 6000
    python -m ddpm_tutorial sample --checkpoint runs/cpu.pt --n 32 --png grid.png --tensor samples.pt
    python -m ddpm_tutorial export --checkpoint runs/cpu.pt --out my_model.pt

Every argument is checked before any long work starts; an error is one line saying what was
wrong and what to do, and the exit code is 1 (2 for a usage error, 130 after Ctrl-C).
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


def _train(args) -> None:
    from .checkpoint import check_output_path, configs_from_checkpoint, load_checkpoint
    from .config import get_preset
    from .data import load_fashion_mnist
    from .runinfo import hardware_summary
    from .train import build_trainer

    preset = get_preset(args.preset)
    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed", "subset")
                 if getattr(args, k) is not None}
    if args.resume:    # the checkpoint's own configs win over the preset's
        if args.preset:
            raise ValueError(f"--preset {args.preset} cannot be combined with --resume: a resumed run keeps "
                             "the settings it was started with (change only --steps)")
        if set(overrides) - {"steps"}:
            raise ValueError(f"--resume continues a run with its own settings; only --steps may change, "
                             f"not {', '.join('--' + k.replace('_', '-') for k in set(overrides) - {'steps'})}")
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
    print(f"preset {preset.name} on {hardware_summary()}; checkpoint -> {out}")
    data, labels = load_fashion_mnist(train=True, subset=train_cfg.subset, root=args.data)
    trainer = build_trainer(preset, data, train=train_cfg, labels=labels if preset.model.num_classes else None)
    if args.resume:
        trainer.resume(args.resume)
        trainer.cfg = train_cfg          # the same run, with a new number of total steps
        print(f"resumed at step {trainer.step}")
    start = trainer.step
    try:
        trainer.fit(checkpoint_path=out, checkpoint_every=args.save_every)
    except KeyboardInterrupt:
        if trainer.step > start or (args.resume and out == Path(args.resume)):   # fit saved, or nothing new
            data_arg = f" --data {shlex.quote(args.data)}" if args.data else ""
            print(f"resume with: python -m ddpm_tutorial train --resume {shlex.quote(str(out))}{data_arg}",
                  file=sys.stderr)
        raise
    print(f"done: {trainer.step} steps, final loss {trainer.history.loss[-1]:.4f}, "
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
        save_grid(result.images, args.png)
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

    t = sub.add_parser("train", help="train a DDPM on Fashion-MNIST")
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
    s.add_argument("--tensor", help="write the (N, 1, 28, 28) tensor in [-1, 1] here (torch.save)")
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
        print(f"error: {_one_line(err)}", file=sys.stderr)
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
