"""Sample quality at a fixed wall-clock training budget: our presets against peer set-ups.
Prints markdown tables; asserts nothing.

    python bench/quality.py                                   # every set-up, 15 min each
    python bench/quality.py --setups ours-cpu --json ours-cpu.json   # one at a time ...
    python bench/quality.py --from-json *.json                # ... then one table
    python bench/quality.py --setups ours-cpu:lr=2e-3,batch_size=64,base_channels=48
    python bench/quality.py --setups ours-cpu --steps-sweep --ddpm-n 100

The same work for every set-up: Fashion-MNIST's 60k training images, linear betas with
T=1000, eps prediction, L_simple, Adam with gradient clipping and an EMA of the weights
(our ``Trainer``, one data order for a given batch size), trained for the same wall-clock
minutes; then the EMA weights are sampled with our ``ddim_sample`` (same steps, eta 0, same
seed and x_T) and scored with ``sample_quality`` at the same n, next to its floor (real vs
real) and ceiling (noise). Only the network and, for ``ours-*``, the preset's own training
settings differ. A set-up name may carry overrides: ``name:field=value,...`` with fields of
TrainConfig (any set-up) or ModelConfig (``ours-*`` only); tuples as ``channel_mults=1-2-2``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ddpm_tutorial.config import DiffusionConfig, TrainConfig, get_preset, hardware_summary
from ddpm_tutorial.diffusion import q_sample
from ddpm_tutorial.sampling import ddim_sample, ddpm_sample
from ddpm_tutorial.train import Trainer
from ddpm_tutorial.unet import UNet, count_parameters

sys.path.insert(0, str(Path(__file__).parent))
from peers import PEERS  # noqa: E402

OURS = ("ours-cpu", "ours-gpu")
SETUPS = (*OURS, *PEERS)
# --sweep: variants of the cpu preset, each trained for the full budget (cost: minutes x 5)
SWEEP = ("ours-cpu", "ours-cpu:lr=5e-4", "ours-cpu:lr=2e-3", "ours-cpu:batch_size=64",
         "ours-cpu:base_channels=48")
SWEEP_DDIM_STEPS = (10, 20, 50, 100)
BASELINE = "ours-cpu"


# --------------------------------------------------------------------------- set-ups

def _convert(text: str, default):
    """A CLI string as the type of a dataclass field's default."""
    if isinstance(default, bool):
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"expected a boolean, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, tuple):
        return tuple(int(v) for v in text.split("-"))
    if text.lower() == "none":
        return None
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        value = float(text)
        return int(value) if isinstance(default, int) and value.is_integer() else value
    return text


def parse_setup(spec: str) -> tuple[str, dict]:
    """'ours-cpu:lr=2e-3,batch_size=64' -> ('ours-cpu', {'lr': '2e-3', 'batch_size': '64'})."""
    base, _, rest = spec.partition(":")
    if base not in SETUPS:
        raise SystemExit(f"unknown set-up {base!r}; expected one of {', '.join(SETUPS)} (optionally ':field=value,...')")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"set-up {spec!r}: override {item!r} is not field=value")
        overrides[key.strip()] = value.strip()
    return base, overrides


def _apply(obj, overrides: dict, spec: str):
    """A copy of dataclass ``obj`` with those overrides that name its fields; returns (copy, rest)."""
    names = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    mine = {k: _convert(v, names[k]) for k, v in overrides.items() if k in names}
    try:
        return dataclasses.replace(obj, **mine), {k: v for k, v in overrides.items() if k not in names}
    except (ValueError, TypeError) as err:
        raise SystemExit(f"set-up {spec!r}: {err}") from err


def build_setup(spec: str, args) -> dict:
    """Model, TrainConfig and notes of one set-up. Weights are initialised from seed 0."""
    base, overrides = parse_setup(spec)
    if "steps" in overrides:
        raise SystemExit(f"set-up {spec!r}: 'steps' follows from --minutes, it cannot be set")
    torch.manual_seed(0)
    if base in OURS:
        preset = get_preset(base.split("-")[1])
        model_cfg, rest = _apply(preset.model, overrides, spec)
        train_cfg, rest = _apply(preset.train, rest, spec)
        model = UNet(model_cfg)
    else:
        _, model = PEERS[base]()
        cpu = get_preset("cpu").train
        peer_defaults = TrainConfig(
            batch_size=cpu.batch_size if args.batch_size is None else args.batch_size, lr=args.lr,
            warmup_steps=args.warmup, lr_decay="constant",
            ema_decay=cpu.ema_decay if args.ema_decay is None else args.ema_decay)
        train_cfg, rest = _apply(peer_defaults, overrides, spec)
    if rest:
        raise SystemExit(f"set-up {spec!r}: unknown field(s) {sorted(rest)} for {base}")
    return {"name": spec, "base": base, "model": model, "train": train_cfg}


# --------------------------------------------------------------------------- training

def train_for(trainer: Trainer, seconds: float, log_every: float) -> float:
    """Call ``trainer.train_step()`` until ``seconds`` of wall clock have passed; returns the
    seconds spent. A cosine lr decay is defined over ``cfg.steps``, so ``cfg.steps`` is set to
    the steps expected to fit the budget (from the speed after 20 steps, refined at 25% and
    50% of the budget) and the decay ends near the budget's end."""
    cfg = trainer.cfg
    start = last_log = time.perf_counter()
    refine_at = [0.25 * seconds, 0.5 * seconds]
    while True:
        trainer.train_step()
        _sync(trainer.device)
        elapsed = time.perf_counter() - start
        if cfg.lr_decay != "constant" and (trainer.step == 20 or (refine_at and elapsed >= refine_at[0])):
            if trainer.step > 20:
                refine_at.pop(0)
            cfg.steps = max(trainer.step + 1, round(trainer.step / elapsed * seconds))
        if elapsed >= seconds:
            return elapsed
        if elapsed - (last_log - start) >= log_every:
            last_log = time.perf_counter()
            recent = trainer.history.loss[-100:]
            print(f"    {elapsed / 60:5.1f} min  step {trainer.step:6d}  loss {sum(recent) / len(recent):.4f}  "
                  f"{trainer.step * cfg.batch_size / elapsed:6.0f} img/s  lr {trainer.optimizer.param_groups[0]['lr']:.2e}",
                  file=sys.stderr, flush=True)


@torch.no_grad()
def refresh_batchnorm(model: nn.Module, trainer: Trainer, batches: int = 20) -> bool:
    """Recompute BatchNorm statistics for ``model``'s (EMA) weights on noised training batches.

    ``AveragedModel`` averages parameters only (``use_buffers=False``) and copies the buffers
    from the live model, so the EMA copy would normalise with the running mean/var of the
    *live* weights. torch's docs advise recomputing them for the averaged weights: this is
    SWA's ``update_bn`` with x_t ~ q(x_t | x_0) at uniform t as the inputs (a cumulative
    average over ``batches`` batches). Returns False when there is no BatchNorm.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                     # None: a cumulative (equal-weight) average
    model.train()
    g = torch.Generator().manual_seed(12345)
    data, B, T = trainer.data, trainer.cfg.batch_size, trainer.schedule.T
    for _ in range(batches):
        x0 = data[torch.randint(len(data), (B,), generator=g)]
        t = torch.randint(0, T, (B,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x0, t, eps = x0.to(trainer.device), t.to(trainer.device), eps.to(trainer.device)
        model(q_sample(trainer.schedule, x0, t, eps), t)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return True


# --------------------------------------------------------------------------- sampling

def sample(model, schedule, n: int, steps: int, seed: int, device, batch: int, ddpm: bool = False):
    """n samples in chunks of ``batch``, from the x_T a single call with ``seed`` would draw
    (so chunking does not change DDIM's eta=0 result). Returns (images, seconds)."""
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn((n, 1, 28, 28), generator=generator)
    start, chunks = time.perf_counter(), []
    for x in x_T.split(batch):
        if ddpm:
            out = ddpm_sample(model, schedule, len(x), device=device, progress=False, generator=generator, x_T=x)
        else:
            out = ddim_sample(model, schedule, len(x), steps=steps, eta=0.0, device=device,
                              progress=False, generator=generator, x_T=x)
        chunks.append(out.images)
    _sync(device)
    return torch.cat(chunks), time.perf_counter() - start


def wait_for_classifier(minutes: float) -> None:
    """The metric's classifier weights may still be in training elsewhere: poll for them."""
    from ddpm_tutorial.metrics import WEIGHTS
    deadline = time.time() + 60 * minutes
    while not WEIGHTS.is_file():
        if time.time() > deadline:
            raise SystemExit(f"classifier weights {WEIGHTS} did not appear within {minutes} min; "
                             "create them with `python bench/train_classifier.py`")
        print(f"    waiting for {WEIGHTS} ...", file=sys.stderr, flush=True)
        time.sleep(30)
    time.sleep(2)   # let a writer that is not atomic finish


def score(images) -> dict:
    from ddpm_tutorial.metrics import sample_quality
    return sample_quality(images).as_dict()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- one set-up

def run_setup(spec: str, data, args, device) -> dict:
    setup = build_setup(spec, args)
    model, cfg = setup["model"], setup["train"]
    print(f"[{spec}] {count_parameters(model):,} parameters, batch {cfg.batch_size}, lr {cfg.lr:g} "
          f"({cfg.lr_decay}), EMA {cfg.ema_decay}; training {args.minutes} min", file=sys.stderr, flush=True)
    cfg = dataclasses.replace(cfg, steps=10**9)           # set by train_for when the lr decays
    train_data = data[:cfg.subset] if cfg.subset else data
    trainer = Trainer(model, train_data, cfg, DiffusionConfig(), device)
    seconds = train_for(trainer, 60 * args.minutes, log_every=max(10.0, 6 * args.minutes))
    loss = trainer.history.loss[-100:]
    net = trainer.ema.module if args.sample_from == "ema" else trainer.model
    bn_refreshed = args.sample_from == "ema" and refresh_batchnorm(net, trainer)
    print(f"[{spec}] {trainer.step} steps; sampling {args.n_samples} with DDIM {args.ddim_steps}",
          file=sys.stderr, flush=True)
    images, sample_s = sample(net, trainer.schedule, args.n_samples, args.ddim_steps, args.seed, device,
                              args.sample_batch)
    wait_for_classifier(args.wait_classifier)
    result = {
        "name": spec, "base": setup["base"], "params": count_parameters(model),
        "train": dataclasses.asdict(cfg) | {"steps": trainer.step, "lr_decay_steps": cfg.steps if cfg.lr_decay != "constant" else None},
        "budget_minutes": args.minutes, "train_seconds": seconds,
        "images_per_s": trainer.step * cfg.batch_size / seconds,
        "final_loss": sum(loss) / len(loss), "sample_seconds": sample_s,
        "ddim_steps": args.ddim_steps, "sampled_from": args.sample_from, "bn_refreshed": bn_refreshed,
        "quality": score(images), "sweep": [],
    }
    print(f"[{spec}] FD {result['quality']['fd']:.2f}", file=sys.stderr, flush=True)
    if args.json and setup["base"] in OURS:            # keep the weights: --checkpoint rescores them
        path = Path(args.json).with_suffix("").with_name(
            Path(args.json).stem + "." + re.sub(r"[^\w.=-]+", "_", spec) + ".pt")
        trainer.save(path, include_optimizer=False)
        result["checkpoint"] = str(path)
    if args.steps_sweep and setup["base"] in OURS:
        result["sweep"] = steps_sweep(net, trainer.schedule, args, device, (images, sample_s))
    return result


def steps_sweep(model, schedule, args, device, done) -> list:
    """Sampling speed against quality: DDIM at 10/20/50/100 steps and DDPM's 1000 steps."""
    rows = []
    for steps in SWEEP_DDIM_STEPS:
        images, seconds = done if steps == args.ddim_steps else sample(
            model, schedule, args.n_samples, steps, args.seed, device, args.sample_batch)
        rows.append({"sampler": "DDIM", "steps": steps, "n": args.n_samples, "seconds": seconds, **score(images)})
    n = args.ddpm_n or args.n_samples
    per_image_step = done[1] / (args.n_samples * args.ddim_steps)
    print(f"    DDPM 1000 steps, n={n}: about {per_image_step * n * 1000 / 60:.1f} min", file=sys.stderr, flush=True)
    images, seconds = sample(model, schedule, n, 1000, args.seed, device, args.sample_batch, ddpm=True)
    rows.append({"sampler": "DDPM", "steps": 1000, "n": n, "seconds": seconds, **score(images)})
    return rows


def sweep_checkpoint(path: str, args) -> dict:
    """``--checkpoint``: the sampling sweep for weights saved by a run (or the shipped ones)."""
    from ddpm_tutorial.checkpoint import model_from_checkpoint
    model, schedule, ckpt = model_from_checkpoint(path, device=args.device)
    print(f"[{path}] {ckpt['step']} training steps; sampling {args.n_samples} with DDIM {args.ddim_steps}",
          file=sys.stderr, flush=True)
    done = sample(model, schedule, args.n_samples, args.ddim_steps, args.seed, args.device, args.sample_batch)
    return {"checkpoint": str(path), "train_steps": ckpt["step"], "params": count_parameters(model),
            "sweep": steps_sweep(model, schedule, args, args.device, done)}


def plot_sweep(sweep: list, path: str) -> None:
    """FD against sampling seconds per image, one point per sampler row, floor drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for sampler, color in (("DDIM", "C0"), ("DDPM", "C3")):
        rows = [s for s in sweep if s["sampler"] == sampler]
        ms = [1000 * s["seconds"] / s["n"] for s in rows]
        ax.plot(ms, [s["fd"] for s in rows], "o-", color=color,
                label=f"{sampler} (n={', '.join(str(n) for n in sorted({s['n'] for s in rows}))})")
        for x, s in zip(ms, rows):
            ax.annotate(str(s["steps"]), (x, s["fd"]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8, color=color)
    for n in sorted({s["n"] for s in sweep}):
        floor = next(s["fd_real"] for s in sweep if s["n"] == n)
        ax.axhline(floor, color="grey", ls=":", lw=1)
        ax.text(1.0, floor, f" real vs real\n n={n}", transform=ax.get_yaxis_transform(), fontsize=7,
                color="grey", va="center")
    ax.legend(fontsize=8, title="sampler (steps above points)", title_fontsize=8)
    ax.set(xscale="log", xlabel="sampling ms per image (log)", ylabel="Fréchet distance (classifier features)",
           title="Sampling steps against quality")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"plot: {path}", file=sys.stderr)


# --------------------------------------------------------------------------- tables

def _distinct(results: list, key) -> list:
    return list(dict.fromkeys(key(r) for r in results))


def print_tables(results: list) -> None:
    base = next((r for r in results if r["name"] == BASELINE), None) or \
        next((r for r in results if r["base"] == BASELINE), None)
    print()
    for hardware in _distinct(results, lambda r: r["hardware"]):
        print(f"hardware: {hardware}")
    for command in _distinct(results, lambda r: r["command"]):
        print(f"command: {command}")
    print("\n| set-up | params | batch | lr | train img/s | steps | final loss | sampling s | FD | floor (real) "
          "| ceiling (noise) | confidence | class spread | FD / FD(ours-cpu) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        q, t = r["quality"], r["train"]
        ratio = f"{q['fd'] / base['quality']['fd']:.2f}" if base and base["quality"]["fd"] > 0 else "n/a"
        lr = f"{t['lr']:g} {'cos' if t['lr_decay'] == 'cosine' else 'const'}"
        print(f"| {r['name']} | {r['params']:,} | {t['batch_size']} | {lr} | {r['images_per_s']:.0f} | {t['steps']:,} "
              f"| {r['final_loss']:.4f} | {r['sample_seconds']:.1f} | {q['fd']:.2f} | {q['fd_real']:.2f} "
              f"| {q['fd_noise']:.1f} | {q['confidence']:.3f} | {q['class_spread']:.3f} | {ratio} |")
    r0 = results[0]
    print(f"\nEach set-up: {r0['budget_minutes']:g} min of training (wall clock) on Fashion-MNIST's 60k training "
          f"images, linear betas T=1000, eps prediction, Adam, grad clip 1, EMA; samples from the "
          f"{r0['sampled_from'].upper()} weights, DDIM {r0['ddim_steps']} steps, eta 0, seed {r0['seed']}, "
          f"n={r0['quality']['n']}; FD on Fashion-MNIST classifier features (not comparable with published FIDs). "
          "Final loss: mean of the last 100 steps.")
    conditions = _distinct(results, lambda r: (r["budget_minutes"], r["sampled_from"], r["ddim_steps"],
                                               r["seed"], r["quality"]["n"], r["hardware"]))
    if len(conditions) > 1:
        print("WARNING: these results differ in budget, sampler, seed, n or hardware; they do not compare.")
    print("ours-*: the preset's own TrainConfig (batch, lr with warm-up and cosine decay to 10% ending at "
          "the budget, EMA decay).", end="")
    for t in _distinct([r for r in results if r["base"] not in OURS],
                       lambda r: tuple(r["train"][k] for k in ("batch_size", "lr", "warmup_steps", "lr_decay", "ema_decay"))):
        print(f" Peers: batch {t[0]}, lr {t[1]:g} after {t[2]} warm-up steps, then {t[3]}, EMA {t[4]}.", end="")
    print(f" Ratio: FD / FD({base['name']})." if base and base["name"] != BASELINE else "")
    if any(r["bn_refreshed"] for r in results):
        print("BatchNorm statistics of the EMA weights were recomputed on 20 noised training batches "
              "before sampling (AveragedModel copies them from the live weights).")
    few = [r["name"] for r in results if r["sampled_from"] == "ema" and r["train"]["steps"] < 3 / (1 - r["train"]["ema_decay"])]
    if few:
        print(f"Note: {', '.join(few)} ran fewer than 3/(1 - EMA decay) steps, so the EMA still holds "
              "much of the early weights; try `--sample-from live`.")
    for r in results:
        if r["sweep"]:
            print_sweep(r["name"], r["sweep"])


def print_sweep(name: str, sweep: list) -> None:
    print(f"\n{name}: sampling steps against quality\n")
    print("| sampler | steps | n | seconds | ms / image | FD | floor (real) | ceiling (noise) |")
    print("|---|---|---|---|---|---|---|---|")
    for s in sweep:
        print(f"| {s['sampler']} | {s['steps']} | {s['n']} | {s['seconds']:.1f} | "
              f"{1000 * s['seconds'] / s['n']:.1f} | {s['fd']:.2f} | {s['fd_real']:.2f} | {s['fd_noise']:.1f} |")
    if len({s["n"] for s in sweep}) > 1:
        print("\nCompare FD only between rows of equal n (its bias depends on n).")


# --------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget per set-up")
    p.add_argument("--setups", nargs="+", default=None, metavar="NAME[:field=value,...]",
                   help=f"from {', '.join(SETUPS)} (default: all of them, but ours-gpu only with CUDA: "
                        "on two CPU cores the defaults take about 1.5-2 hours)")
    p.add_argument("--sweep", action="store_true", help=f"add cpu-preset variants: {' '.join(SWEEP[1:])}")
    p.add_argument("--n-samples", type=int, default=500)
    p.add_argument("--ddim-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=None, help="peers' batch size (default: the cpu preset's)")
    p.add_argument("--lr", type=float, default=2e-4, help="peers' learning rate (constant after warm-up)")
    p.add_argument("--warmup", type=int, default=100, help="peers' warm-up steps")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="peers' EMA decay (default: the cpu preset's; a slower EMA would still hold the "
                        "peers' early weights after their few hundred steps)")
    p.add_argument("--sample-from", choices=("ema", "live"), default="ema")
    p.add_argument("--sample-batch", type=int, default=250, help="images per sampling call (memory only)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (x_T)")
    p.add_argument("--steps-sweep", action="store_true",
                   help="ours-*: also DDIM 10/20/50/100 and DDPM 1000 (DDPM is slow on a CPU; see --ddpm-n)")
    p.add_argument("--ddpm-n", type=int, default=0, help="samples for the DDPM row (default --n-samples)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--wait-classifier", type=float, default=120.0, help="minutes to wait for the metric's weights")
    p.add_argument("--checkpoint", metavar="PT",
                   help="no training: the DDIM/DDPM sweep of a saved checkpoint ('shipped' = the package's)")
    p.add_argument("--plot", metavar="PNG", help="with --checkpoint: also plot the sweep here")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--from-json", nargs="+", metavar="FILE", help="print one table from earlier --json files")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.setups is None:
        args.setups = [s for s in SETUPS if s != "ours-gpu" or torch.device(args.device).type == "cuda"]
    if args.from_json:
        print_tables([r for path in args.from_json for r in json.loads(Path(path).read_text())["results"]])
        return

    meta = {"hardware": hardware_summary(args.device), "seed": args.seed,
            "command": "python bench/quality.py " + shlex.join(sys.argv[1:])}
    if args.checkpoint:
        from ddpm_tutorial.checkpoint import shipped_checkpoint_path
        path = shipped_checkpoint_path() if args.checkpoint == "shipped" else args.checkpoint
        result = sweep_checkpoint(path, args) | meta
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        if args.plot:
            plot_sweep(result["sweep"], args.plot)
        print(f"\nhardware: {result['hardware']}\ncommand: {result['command']}")
        print_sweep(f"{path} ({result['train_steps']} training steps)", result["sweep"])
        return

    specs = list(dict.fromkeys(args.setups + (list(SWEEP) if args.sweep else [])))
    for spec in specs:
        build_setup(spec, args)                         # fail on a bad name before any training
    from ddpm_tutorial.data import load_fashion_mnist
    data, _ = load_fashion_mnist(train=True)           # (60000, 1, 28, 28) in [-1, 1]
    results = []
    for spec in specs:
        results.append(run_setup(spec, data, args, args.device) | meta)
        if args.json:                                   # after each set-up: a crash keeps what was done
            Path(args.json).write_text(json.dumps({"results": results}, indent=1))
    print_tables(results)


if __name__ == "__main__":
    main()
