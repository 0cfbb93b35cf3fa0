"""How close a cpu-preset training step runs to this CPU's peak, and what each CPU lever buys.
Prints a markdown table (and JSON with --json); asserts nothing.

    python bench/cpu_efficiency.py                   # every lever, 3 alternated rounds of 10 s
    python bench/cpu_efficiency.py --seconds 20 --rounds 5
    python bench/cpu_efficiency.py --threads 1      # on a shared machine: one thread per variant
    python bench/cpu_efficiency.py --threads 1 --variants batch_size=16 attention=true num_res_blocks=2

Levers, each a whole Algorithm-1 step (forward, backward, Adam) of the cpu preset's network at
its batch size on random data: fp32 (the preset), channels-last memory format, bf16 autocast
(fast only where the CPU has AVX-512-bf16 or AMX; /proc/cpuinfo says which), both together,
and torch's thread count 1 against the default; ``--variants``: steps of the preset with
ModelConfig or TrainConfig fields changed (a wider network, a smaller batch; bf16 autocast
where the variant sets ``cpu_precision=bf16``), to convert a lever that changes the cost of a
step into the steps it buys in the preset's time. The variants are timed in alternation, round
after round, so a change in the machine's load hits all of them; the table gives each one's
median rate and its ratio to fp32. Peak: a 2048 x 2048 matmul in fp32 and bf16 on the same
threads. Achieved GFLOP/s of a step: images/s x 3 x forward FLOPs (backward costs about twice
the forward).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics

import torch

import common
from speed import flops_per_image, repeat_for

LEVERS = {"fp32": (False, torch.float32), "channels-last": (True, torch.float32),
          "bf16 autocast": (False, torch.bfloat16), "bf16 + channels-last": (True, torch.bfloat16)}


def make_step(preset, channels_last: bool, dtype):
    """One training step of ``preset``'s network (seed 0) under the given memory format and precision."""
    from ddpm_tutorial.diffusion import loss_simple
    from ddpm_tutorial.schedules import NoiseSchedule
    from ddpm_tutorial.unet import UNet
    torch.manual_seed(0)
    model = UNet(preset.model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    schedule = NoiseSchedule.from_config(preset.diffusion)
    x0 = (torch.rand(preset.train.batch_size, 1, 28, 28) * 2 - 1).contiguous(memory_format=fmt)

    def step():
        autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with autocast:
            loss = loss_simple(model, schedule, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, model


def rate(fn, seconds: float, per_call: float) -> float:
    """``per_call`` units (images, FLOPs) per second of ``fn``, timed by speed.repeat_for."""
    calls, wall, _ = repeat_for(fn, seconds, "cpu")
    return calls * per_call / wall


def matmul_gflops(dtype, seconds: float) -> float:
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    return rate(lambda: a @ b, seconds, 2 * 2048 ** 3) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", nargs="*", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                   help="variants of the preset, each with these ModelConfig / TrainConfig fields replaced")
    common.add_run_args(p)
    args = p.parse_args()
    from ddpm_tutorial.config import PRESETS
    common.setup(args)
    record = common.run_record(torch.device("cpu"))
    common.print_header([record])
    preset, threads = PRESETS[args.preset], torch.get_num_threads()
    presets = {name: preset for name in LEVERS}
    for text in args.variants:
        sets = dict(item.partition("=")[::2] for item in text.split(","))
        presets[text] = dataclasses.replace(preset, model=common.with_sets(preset.model, sets),
                                            train=common.with_sets(preset.train, sets))
    levers = {name: LEVERS.get(name, LEVERS["bf16 autocast" if presets[name].train.cpu_precision == "bf16"
                                             else "fp32"]) for name in presets}   # (channels_last, dtype)
    levers["fp32, 1 thread"] = LEVERS["fp32"]
    steps = {name: make_step(presets[name], *levers[name]) for name in presets}
    gflops = {name: flops_per_image(model) / 1e9 for name, (_, model) in steps.items()}
    gflop = gflops["fp32"]
    rates = {name: [] for name in [*presets] + (["fp32, 1 thread"] if threads > 1 else [])}
    for r in range(args.rounds):
        names = list(rates) if r % 2 == 0 else list(reversed(rates))
        for name in names:
            torch.set_num_threads(1 if name == "fp32, 1 thread" else threads)
            lever = "fp32" if name == "fp32, 1 thread" else name
            rates[name].append(rate(steps[lever][0], args.seconds, presets[lever].train.batch_size))
            common.log(f"    round {r + 1} {name:22s} {rates[name][-1]:6.1f} img/s")
    torch.set_num_threads(threads)
    peak = {dt: matmul_gflops(dt, args.seconds) for dt in (torch.float32, torch.bfloat16)}
    base = statistics.median(rates["fp32"])
    rows = [[name, f"{statistics.median(v):.1f}", f"{statistics.median(v) / base:.2f}",
             f"{3 * gflops.get(name, gflop) * statistics.median(v):.1f}",
             f"{3 * gflops.get(name, gflop) * statistics.median(v) / peak[levers[name][1]]:.0%}"]
            for name, v in rates.items()]
    common.print_table(["variant", "train img/s (median)", "ratio to fp32", "achieved GFLOP/s",
                        "of matmul peak (same dtype)"], rows)
    print(f"\n{args.preset} preset: {gflop:.3f} GFLOP/img forward, batch {preset.train.batch_size}, {threads} threads "
          f"(1 where named); matmul peak 2048^3: fp32 {peak[torch.float32]:.0f}, bf16 {peak[torch.bfloat16]:.0f} "
          f"GFLOP/s; {args.rounds} alternated rounds of {args.seconds:g} s.")
    common.write_json(args.json, {"results": [{"rates": rates, "gflop": gflop, "gflop_per_variant": gflops, "peak_gflops":
                                               {str(k): v for k, v in peak.items()}} | record]})


if __name__ == "__main__":
    main()
