"""Command line: train and sample outside the notebooks.

    python -m ddpm_tutorial train --preset cpu --out runs/cpu.pt
    python -m ddpm_tutorial train --resume runs/cpu.pt --steps 6000
    python -m ddpm_tutorial sample --checkpoint runs/cpu.pt --n 32 --png grid.png --tensor samples.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .config import PRESET_NAMES, get_preset, hardware_summary, preset_name


def _train(args) -> None:
    from .checkpoint import configs_from_checkpoint, load_checkpoint
    from .data import load_fashion_mnist
    from .train import Trainer
    from .unet import UNet

    preset = get_preset(args.preset)
    if args.resume:    # the checkpoint's own configs win over the preset's
        preset.model, preset.diffusion, preset.train = configs_from_checkpoint(load_checkpoint(args.resume))
    for key in ("steps", "batch_size", "lr", "seed", "subset"):
        if getattr(args, key) is not None:
            setattr(preset.train, key, getattr(args, key))
    out = Path(args.out or args.resume or f"runs/{preset.name}.pt")
    print(f"preset {preset.name} on {hardware_summary()}; checkpoint -> {out}")
    torch.manual_seed(preset.train.seed)
    data, _ = load_fashion_mnist(train=True, subset=preset.train.subset, root=args.data)
    trainer = Trainer(UNet(preset.model), data, preset.train, preset.diffusion)
    if args.resume:
        trainer.resume(args.resume)
        print(f"resumed at step {trainer.step}")
    trainer.fit(checkpoint_path=out, checkpoint_every=args.save_every)
    print(f"done: {trainer.step} steps, final loss {trainer.history.loss[-1]:.4f}, "
          f"{trainer.history.seconds:.0f} s this run")


def _sample(args) -> None:
    from .checkpoint import model_from_checkpoint
    from .sampling import ddim_sample, ddpm_sample
    from .viz import save_grid

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, schedule, ckpt = model_from_checkpoint(args.checkpoint, device=device)
    if args.ddim_steps:
        result = ddim_sample(model, schedule, n=args.n, steps=args.ddim_steps, eta=args.eta, seed=args.seed)
    else:
        result = ddpm_sample(model, schedule, n=args.n, seed=args.seed)
    if not args.png and not args.tensor:
        args.png = "samples.png"
    if args.png:
        save_grid(result.images, args.png)
        print(f"wrote {args.png}")
    if args.tensor:
        torch.save(result.images, args.tensor)
        print(f"wrote {args.tensor}: tensor {tuple(result.images.shape)} in [-1, 1]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddpm_tutorial", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a DDPM on Fashion-MNIST")
    t.add_argument("--preset", choices=PRESET_NAMES, default=None,
                   help=f"default: {preset_name()} (DDPM_QUICK=1 forces quick)")
    t.add_argument("--out", help="checkpoint path (default runs/<preset>.pt)")
    t.add_argument("--resume", help="continue from this checkpoint (and write back to it)")
    t.add_argument("--steps", type=int, help="total optimiser steps")
    t.add_argument("--batch-size", dest="batch_size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--subset", type=int, help="use only the first N training images")
    t.add_argument("--data", help="folder with the Fashion-MNIST files (else DDPM_DATA_DIR, Debian, download)")
    t.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (0: only at the end)")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="sample images from a checkpoint")
    s.add_argument("--checkpoint", default=None, help="default: the checkpoint shipped with the package")
    s.add_argument("--n", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ddim-steps", type=int, default=0, help="0: full DDPM (T steps); else DDIM with this many")
    s.add_argument("--eta", type=float, default=0.0)
    s.add_argument("--png", help="write an image grid here")
    s.add_argument("--tensor", help="write the (N, 1, 28, 28) tensor in [-1, 1] here (torch.save)")
    s.set_defaults(func=_sample)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
