"""Sample quality at a fixed training budget: our presets against peer set-ups (bench/QUALITY.md).
Prints a markdown table (and JSON with --json); asserts nothing.

    python bench/quality.py                                        # every set-up, 15 min each
    python bench/quality.py --setups ours-cpu --json q-ours.json   # one at a time ...
    python bench/quality.py --from-json q-*.json                   # ... then one table
    python bench/quality.py --setups lucidrains --peer-recipe paper ours   # both peer recipes
    python bench/quality.py --setups ours-cpu --set lr=2e-3 channel_mults=1-1-2
    python bench/quality.py --steps 6 --n 64 --ddim-steps 2        # a step budget: a reproducible FD

Every set-up trains with our ``Trainer`` on Fashion-MNIST's 60k images (linear betas, T=1000,
eps prediction, L_simple, Adam, gradient clipping, EMA, one data order per seed) for the same
budget; then its EMA weights draw n DDIM samples (eta 0 unless --eta, the same x_T for all) that
``sample_quality`` scores with a bootstrap spread. Only the network and the recipe differ.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import time
from pathlib import Path

import torch

import common
from peers import PEERS, refresh_batchnorm

OURS = {"ours-cpu": "cpu", "ours-gpu": "gpu"}
SETUPS = (*OURS, *PEERS)
BASELINE = "ours-cpu"
# The peers' own recipe: the paper's Adam lr 2e-4, constant after a short warm-up. Batch size,
# EMA decay and the rest are the cpu preset's, so they are equal for every set-up.
PAPER_RECIPE = dict(lr=2e-4, warmup_steps=100, lr_decay="constant")


def build(setup: str, recipe: str | None, sets: dict, data, labels, device):
    """The trainer of one set-up: ours from its preset, a peer with ``recipe`` ("paper" or "ours",
    the cpu preset's TrainConfig); ``--set`` fields replaced; weights initialised from train.seed."""
    from ddpm_tutorial.config import PRESETS
    from ddpm_tutorial.train import Trainer, build_trainer
    if setup in OURS:
        preset = PRESETS[OURS[setup]]
        preset = dataclasses.replace(preset, diffusion=common.with_sets(preset.diffusion, sets))
        train = common.with_sets(preset.train, sets)
        x = data[:train.subset] if train.subset else data
        return build_trainer(preset, x, device, model=common.with_sets(preset.model, sets), train=train,
                             labels=labels[:len(x)])
    cpu = PRESETS["cpu"]
    train = common.with_sets(dataclasses.replace(cpu.train, **(PAPER_RECIPE if recipe == "paper" else {})), sets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        _, net = PEERS[setup]()
    return Trainer(net, data[:train.subset] if train.subset else data, train, cpu.diffusion, device)


def train(trainer, minutes: float | None, steps: int | None) -> float:
    """Train for ``steps`` steps, or until ``minutes`` of wall clock have passed; returns seconds.
    A cosine decay is defined over a step count: under a wall-clock budget that count is the
    number expected to fit (from the speed after 20 steps, refined at 25% and 50% of the budget),
    so the decay ends near the budget's end."""
    budget = 60 * minutes if minutes else math.inf
    trainer.cfg = dataclasses.replace(trainer.cfg, steps=steps or 10**9)
    fit_decay = minutes and trainer.cfg.lr_decay != "constant"
    refine_at, start, last_log = [0.25 * budget, 0.5 * budget], time.perf_counter(), 0.0
    while steps is None or trainer.step < steps:
        trainer.train_step()
        common.sync(trainer.device)
        elapsed = time.perf_counter() - start
        if fit_decay and (trainer.step == 20 or (refine_at and elapsed >= refine_at[0])):
            if trainer.step > 20:
                refine_at.pop(0)
            trainer.cfg = dataclasses.replace(
                trainer.cfg, steps=max(trainer.step + 1, round(trainer.step / elapsed * budget)))
        if elapsed >= budget:
            break
        if elapsed - last_log >= max(10.0, budget / 10 if minutes else 60.0):
            last_log, recent = elapsed, trainer.history.loss[-100:]
            common.log(f"    {elapsed / 60:5.1f} min  step {trainer.step:6d}  loss {sum(recent) / len(recent):.4f}  "
                       f"lr {trainer.optimizer.param_groups[0]['lr']:.2e}")
    return time.perf_counter() - start


def run_setup(setup: str, recipe: str | None, args, data, labels, device) -> dict:
    from ddpm_tutorial.metrics import sample_quality
    from ddpm_tutorial.unet import count_parameters
    trainer = build(setup, recipe, args.set, data, labels, device)
    used = [f"{k}={v}" for k, v in args.set.items() if hasattr(trainer.cfg, k) or setup in OURS]
    name = " ".join([setup] + ([f"({recipe} recipe)"] if recipe else []) + used)
    cfg, budget = trainer.cfg, f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    common.log(f"[{name}] {count_parameters(trainer.model):,} parameters, batch {cfg.batch_size}, lr {cfg.lr:g} "
               f"({cfg.lr_decay}), EMA {cfg.ema_decay}; training {budget}")
    seconds = train(trainer, None if args.steps else args.minutes, args.steps)
    net = trainer.ema.module if args.sample_from == "ema" else trainer.model
    bn_refreshed = args.sample_from == "ema" and refresh_batchnorm(net, trainer)
    common.log(f"[{name}] {trainer.step} steps; sampling {args.n} with DDIM {args.ddim_steps}, eta {args.eta:g}")
    images, sample_s = common.draw_samples(net, trainer.schedule, "ddim", args.n, args.ddim_steps, args.seed, device,
                                           eta=args.eta)
    quality = sample_quality(images, n_boot=args.n_boot).as_dict()
    common.log(f"[{name}] FD {common.fd_cell(quality)}")
    loss = trainer.history.loss[-100:]
    result = {"name": name, "setup": setup, "recipe": recipe or "preset", "params": count_parameters(trainer.model),
              "train": dataclasses.asdict(trainer.cfg),
              "diffusion": dataclasses.asdict(trainer.diffusion_cfg), "steps_done": trainer.step, "budget": budget,
              "train_seconds": seconds, "images_per_s": trainer.step * cfg.batch_size / seconds,
              "final_loss": sum(loss) / len(loss), "sample_seconds": sample_s, "ddim_steps": args.ddim_steps,
              "eta": args.eta,
              "seed": args.seed, "sampled_from": args.sample_from, "bn_refreshed": bn_refreshed,
              "quality": quality}
    if args.json and setup in OURS:     # keep the weights: bench/samplers.py --checkpoint sweeps them
        path = Path(args.json).with_name(Path(args.json).stem + "." + re.sub(r"[^\w.=-]+", "_", name) + ".pt")
        result["checkpoint"] = str(trainer.save(path, include_optimizer=False))
    return result


def print_results(results: list) -> None:
    base = next((r for r in results if r["name"] == BASELINE), None) or \
        next((r for r in results if r["setup"] == BASELINE), None)
    common.print_header(results)
    rows = []
    for r in results:
        q, t = r["quality"], r["train"]
        ratio = f"{q['fd'] / base['quality']['fd']:.2f}" if base else "n/a"    # FD / FD(baseline)
        rows.append([r["name"], f"{r['params']:,}", t["batch_size"],
                     f"{t['lr']:g} {'cos' if t['lr_decay'] == 'cosine' else 'const'}", f"{r['images_per_s']:.0f}",
                     f"{r['steps_done']:,}", f"{r['final_loss']:.4f}", f"{r['sample_seconds']:.1f}", common.fd_cell(q),
                     f"{q['fd_real']:.2f}", f"{q['fd_noise']:.1f}", f"{q['confidence']:.3f}", f"{q['class_spread']:.3f}",
                     ratio])
    common.print_table(["set-up", "params", "batch", "lr", "train img/s", "steps", "final loss", "sampling s",
                        "FD ± std", "floor (real)", "ceiling (noise)", "confidence", "class spread",
                        f"FD / FD({base['name'] if base else BASELINE})"], rows)
    r0 = results[0]
    print(f"\nEach set-up: {r0['budget']} of training; {r0['sampled_from'].upper()} weights, DDIM "
          f"{r0['ddim_steps']} steps, eta {r0.get('eta', 0.0):g}, seed {r0['seed']}, n={r0['quality']['n']}; FD on the Fashion-MNIST "
          "classifier's features (not comparable with published FIDs), ± its bootstrap spread. "
          "Final loss: mean of the last 100 steps. Recipes: ours-* and 'ours' = the cpu preset's "
          "(warm-up, cosine decay to 10% ending with the budget, EMA); 'paper' = lr 2e-4 constant.")
    if len({(r["budget"], r["sampled_from"], r["ddim_steps"], r.get("eta", 0.0), r["seed"], r["quality"]["n"],
             r["hardware"])
            for r in results}) > 1:
        print("WARNING: these results differ in budget, sampler, seed, n or hardware; they do not compare.")
    if any(r["bn_refreshed"] for r in results):
        print("BatchNorm statistics of the EMA weights were recomputed on 20 noised training batches.")
    few = [r["name"] for r in results if r["sampled_from"] == "ema" and r["steps_done"] < 3 / (1 - r["train"]["ema_decay"])]
    if few:
        print(f"Note: {', '.join(few)} ran fewer than 3/(1 - EMA decay) steps: the EMA still holds much "
              "of the first weights (try --sample-from live).")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", nargs="+", choices=SETUPS, help="default: all (ours-gpu only with CUDA)")
    p.add_argument("--peer-recipe", nargs="+", choices=("paper", "ours"), default=["paper"],
                   help="the peers' training recipe; both: each peer twice (issue 14, item 3)")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="replace TrainConfig fields (every set-up) or ModelConfig / DiffusionConfig fields (ours-*)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget per set-up")
    budget.add_argument("--steps", type=int, help="a budget in optimiser steps instead (reproducible)")
    p.add_argument("--n", type=int, default=500, help="samples scored per set-up")
    p.add_argument("--ddim-steps", type=int, default=100)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (1: the stochastic sampler of chapter 6)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (x_T)")
    p.add_argument("--sample-from", choices=("ema", "live"), default="ema")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples behind each FD spread")
    p.add_argument("--from-json", nargs="+", metavar="FILE", help="print one table from earlier --json files")
    common.add_run_args(p)
    args = p.parse_args()
    if args.from_json:
        return print_results(common.read_json(args.from_json))
    from ddpm_tutorial.config import DiffusionConfig, ModelConfig, TrainConfig
    from ddpm_tutorial.data import load_fashion_mnist
    args.set = dict(item.partition("=")[::2] for item in args.set)
    fields = {f.name for c in (ModelConfig, TrainConfig, DiffusionConfig) for f in dataclasses.fields(c)} - {"steps"}
    if set(args.set) - fields or "" in args.set.values():
        p.error(f"--set takes FIELD=VALUE of ModelConfig, TrainConfig or DiffusionConfig (the budget sets 'steps'), "
                f"got {args.set}")
    device = common.setup(args)
    setups = args.setups or [s for s in SETUPS if s != "ours-gpu" or device.type == "cuda"]
    runs = [(s, None) for s in setups if s in OURS] + [(s, r) for s in setups if s not in OURS for r in args.peer_recipe]
    data, labels = load_fashion_mnist(train=True)        # (60000, 1, 28, 28) in [-1, 1], (60000,)
    results = []
    for setup, recipe in runs:
        results.append(run_setup(setup, recipe, args, data, labels, device) | common.run_record(device))
        common.write_json(args.json, {"results": results})
    print_results(results)


if __name__ == "__main__":
    main()
