"""Training and sampling speed of each preset's network, and sampling speed before and after a commit.
Prints a markdown table (and JSON with --json); asserts nothing.

    python bench/speed.py                                   # every preset
    python bench/speed.py --presets cpu --seconds 20
    python bench/speed.py --before 9913963 --batch 1 --rounds 6    # that commit's sampling loops against these
    python bench/speed.py --before 573f600 --methods train ddpm    # and its training loop (Trainer.fit)

Training: images/s through whole Algorithm-1 steps (forward, backward, Adam, EMA) at the preset's
batch size, with the precision ``Trainer`` picks (train.autocast_dtype: on CUDA the preset's
precision, on the CPU its cpu_precision).
Sampling: images x network calls per second of the package's own DDIM loop at ``--batch``,
the loop's bookkeeping included.

``--before REV`` exports the package at commit REV (``git archive``) into a temporary folder and
times the same sampling loops under it and under the working tree's package, each in its own
process, alternating (before, after, after, before, ...) so that a change in the machine's load
hits both; it prints each pair's ratio and their median, by wall clock and by the process's own
CPU time (on a loaded machine only the CPU-time ratio means much). The loops use only functions
both versions have.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import common


def flops_per_image(model) -> float:
    """Forward multiply-adds x 2 of the convolutions and linear layers, counted with hooks."""
    total = 0

    def hook(m, args, out):
        nonlocal total
        if isinstance(m, torch.nn.Conv2d):
            total += 2 * out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
        else:
            total += 2 * out.numel() * m.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    size = model.config.image_size
    with torch.no_grad():
        model(torch.randn(1, model.config.in_channels, size, size), torch.tensor([1]))
    for h in hooks:
        h.remove()
    return float(total)


def repeat_for(fn, seconds: float, device) -> tuple[int, float, float]:
    """Call ``fn`` once to warm up (allocator, cuDNN autotuning), then until ``seconds`` have
    passed (at least once). Returns (calls, wall seconds, this process's CPU seconds), synchronised
    on CUDA. On a shared CPU the CPU seconds count only this process's own work, not its waiting."""
    fn()
    common.sync(device)
    calls, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while calls == 0 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    common.sync(device)
    return calls, time.perf_counter() - start, time.process_time() - cpu_start


def random_trainer(preset, device):
    """The preset's Trainer on random images in [-1, 1] (the speed does not depend on them)."""
    from ddpm_tutorial.train import build_trainer
    cfg = preset.model
    data = torch.rand(2048, cfg.in_channels, cfg.image_size, cfg.image_size,
                      generator=torch.Generator().manual_seed(0)) * 2 - 1
    return build_trainer(preset, data, device)


def time_training(preset, device, seconds: float) -> tuple[float, str]:
    """Training images per second, and the precision the Trainer computes in."""
    trainer = random_trainer(preset, device)
    calls, elapsed, _ = repeat_for(trainer.train_step, seconds, device)
    precision = {torch.float16: "fp16 autocast", torch.bfloat16: "bf16 autocast"}[trainer.amp_dtype] \
        if trainer.amp else "fp32"
    return calls * preset.train.batch_size / elapsed, precision


def time_sampling(preset: str, batch: int, methods: list, steps: int, seconds: float, device) -> dict:
    """Images x steps per second of each sampling loop, for the preset's network (seed 0).
    "ddim": ``ddim_sample`` with ``steps`` steps; "ddpm": ``ddpm_sample`` (Algorithm 2) on a
    schedule of T = ``steps``, the same work per step as T = 1000; "update": Algorithm 2's update
    alone (``p_sample`` with a fixed eps, no network) at ``steps`` timesteps of T = 1000, where
    ``extract`` checked its timesteps; "train": ``Trainer.fit`` for ``steps`` more steps (whole
    Algorithm-1 steps with the loop's bookkeeping: the reading back of losses), in training
    images per second. Uses no function newer than the commits ``--before`` compares, so it runs
    under either package."""
    import ddpm_tutorial
    from ddpm_tutorial.config import DiffusionConfig, get_preset
    from ddpm_tutorial.diffusion import p_sample
    from ddpm_tutorial.sampling import ddim_sample, ddpm_sample
    from ddpm_tutorial.schedules import NoiseSchedule
    from ddpm_tutorial.unet import UNet
    torch.manual_seed(0)
    model = UNet(get_preset(preset).model).to(device).eval()
    schedule = NoiseSchedule.from_config(DiffusionConfig()).to(device)
    short = NoiseSchedule.from_config(DiffusionConfig(T=steps)).to(device)     # built once, outside the timing
    torch.manual_seed(0)          # the same network, for the T it is sampled with (the same work per step)
    short_model = UNet(get_preset(preset).model, T=steps).to(device).eval()
    x = torch.randn(batch, 1, 28, 28, device=device)

    def update():
        for i in reversed(range(steps)):
            p_sample(schedule, x, torch.full((batch,), i * (1000 // steps), device=device), x, x)

    loops = {"ddim": lambda: ddim_sample(model, schedule, batch, steps=steps, device=device, progress=False),
             "ddpm": lambda: ddpm_sample(short_model, short, batch, device=device, progress=False),
             "update": update}
    images = dict.fromkeys(loops, batch)
    if "train" in methods:
        trainer = random_trainer(get_preset(preset), device)
        loops["train"] = lambda: trainer.fit(steps=trainer.step + steps, progress=False)
        images["train"] = trainer.cfg.batch_size
    rates = {}
    for method in methods:
        calls, wall, cpu = repeat_for(loops[method], seconds, device)
        rates[method], rates[method + " (CPU time)"] = (calls * images[method] * steps / wall,
                                                        calls * images[method] * steps / cpu)
    return {"rates": rates, "package": os.path.dirname(ddpm_tutorial.__file__)}


def compare(args, device) -> dict:
    """Sampling speed of the package at ``args.before`` against the working tree's, alternated."""
    spec = {"preset": args.presets[0], "batch": args.batch, "methods": args.methods, "steps": args.steps,
            "seconds": args.seconds, "device": str(device)}
    rates = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as old:
        subprocess.run(f"git -C {common.REPO} archive {args.before} ddpm_tutorial | tar -x -C {old}",
                       shell=True, check=True)
        trees = {"before": old, "after": str(common.REPO)}
        for r in range(args.rounds):
            for which in ("before", "after") if r % 2 == 0 else ("after", "before"):
                env = os.environ | {"PYTHONPATH": trees[which]}
                out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                     capture_output=True, text=True, check=True).stdout
                result = json.loads(out.splitlines()[-1])
                if not result["package"].startswith(trees[which]):
                    raise RuntimeError(f"the {which} worker imported {result['package']}, not {trees[which]}")
                rates[which].append(result["rates"])
                common.log(f"    round {r + 1} {which:6s} " + ", ".join(f"{m} {v:.1f}" for m, v in result["rates"].items()))
    ratios = {m: [a[m] / b[m] for a, b in zip(rates["after"], rates["before"])] for m in rates["after"][0]}
    return {"before": args.before, "spec": spec, "rates": rates, "ratios": ratios}


def print_comparison(c: dict) -> None:
    s = c["spec"]
    print(f"\nSpeed, package at {c['before']} (before) vs the working tree (after): preset '{s['preset']}', "
          f"batch {s['batch']}, {s['steps']} steps per call, {len(c['ratios'][s['methods'][0]])} alternated rounds "
          f"of >= {s['seconds']:g} s; '(CPU time)': rates per second of the process's own CPU time")
    common.print_table(
        ["loop", "before (img·steps/s; train: img/s, median)", "after (median)", "after / before, per round",
         "median ratio"],
        [[m, f"{statistics.median(r[m] for r in c['rates']['before']):.1f}",
          f"{statistics.median(r[m] for r in c['rates']['after']):.1f}",
          ", ".join(f"{x:.3f}" for x in c["ratios"][m]), f"**{statistics.median(c['ratios'][m]):.3f}**"]
         for m in c["ratios"]])


def main():
    if sys.argv[1:2] == ["--worker"]:      # one timing, run by compare() under one package
        spec = json.loads(sys.argv[2])
        print(json.dumps(time_sampling(spec["preset"], spec["batch"], spec["methods"], spec["steps"],
                                       spec["seconds"], spec["device"])))
        return
    from ddpm_tutorial.config import PRESETS
    from ddpm_tutorial.unet import UNet, count_parameters
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", choices=list(PRESETS), help="default: every preset (with --before: cpu)")
    p.add_argument("--seconds", type=float, default=15.0, help="timed seconds per measurement")
    p.add_argument("--batch", type=int, default=64, help="images per sampling call")
    p.add_argument("--steps", type=int, default=10, help="sampling steps per timed call")
    p.add_argument("--before", metavar="REV", help="instead: compare sampling at commit REV with the working tree")
    p.add_argument("--methods", nargs="+", choices=("ddim", "ddpm", "update", "train"),
                   default=["ddim", "ddpm", "update"], help="with --before")
    p.add_argument("--rounds", type=int, default=3, help="with --before: alternated pairs of timings")
    common.add_run_args(p)
    args = p.parse_args()
    args.presets = args.presets or (["cpu"] if args.before else list(PRESETS))
    device = common.setup(args)
    record = common.run_record(device)
    common.print_header([record])
    if args.before:
        result = compare(args, device) | record
        print_comparison(result)
        return common.write_json(args.json, {"comparisons": [result]})
    rows = []
    for name in args.presets:
        preset = PRESETS[name]
        model = UNet(preset.model)
        train_rate, precision = time_training(preset, device, args.seconds)
        sample_rate = time_sampling(name, args.batch, ["ddim"], args.steps, args.seconds, device)["rates"]["ddim"]
        rows.append({"preset": name, "params": count_parameters(model), "gflop": flops_per_image(model) / 1e9,
                     "batch": preset.train.batch_size, "precision": precision,
                     "train_images_per_s": train_rate, "train_minutes": preset.train.steps * preset.train.batch_size / train_rate / 60,
                     "sample_image_steps_per_s": sample_rate})
        common.log(f"    {name}: train {train_rate:.0f} img/s, sampling {sample_rate:.0f} img·steps/s")
    common.print_table(["preset", "params", "GFLOP/img (fwd)", "batch", "precision", "train img/s", "est. train min",
                        "sample img·steps/s", "1000-step samples/min"],
                       [[r["preset"], f"{r['params']:,}", f"{r['gflop']:.3f}", r["batch"], r["precision"],
                         f"{r['train_images_per_s']:.0f}", f"{r['train_minutes']:.1f}",
                         f"{r['sample_image_steps_per_s']:.0f}", f"{60 * r['sample_image_steps_per_s'] / 1000:.1f}"]
                        for r in rows])
    print(f"\nSampling: DDIM {args.steps} steps per call at batch {args.batch}.")
    common.write_json(args.json, {"results": [r | record for r in rows]})


if __name__ == "__main__":
    main()
