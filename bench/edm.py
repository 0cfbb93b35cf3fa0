"""Karras et al.'s EDM at the book's CPU budget (book/edm.md). Prints markdown tables; asserts nothing.

    python bench/edm.py shipped --threads 1    # (a) the shipped DDPM checkpoint: Heun against DDIM and
                                               #     DPM-Solver++ at equal network calls -> runs/edm/shipped.json
    python bench/edm.py train --threads 1      # (b) the cpu preset's network trained the EDM way -> train.json
    python bench/edm.py score --threads 1      #     ... sampled with Heun -> edm_scores.json
    python bench/edm.py all --threads 1        # the three above, resuming whatever is cached
    python bench/edm.py report                 # the tables from runs/edm/*.json
    python bench/edm.py all --out /tmp/smoke --steps 20 --n 64 --calls 3 --rate-rounds 1 --rate-steps 2   # a smoke test

(a) samples the shipped checkpoint (the cpu preset, 3,800 steps of L_simple) through
``edm.DDPMDenoiser`` on EDM's rho = 7 grid with Heun's method (deterministic, and with EDM's
churn settings S_churn 80, S_tmin 0.05, S_tmax 50, S_noise 1.003), against DDIM (eta 0 and 1)
and DPM-Solver++(2M) at the same numbers of network calls, every row from the same x_T.
(b) trains ``UNet(PRESETS["cpu"].model)`` inside ``edm.EDMDenoiser`` with ``edm.edm_loss``
and otherwise the cpu preset's recipe through the package's Trainer (the same initial
weights, data order, noise draws, Adam, learning-rate schedule, clipping and EMA; only the
noise level and the loss differ), for the preset's 3,800 steps, after timing EDM's step
against the preset's, alternated in the same process. Every row: n samples of the EMA weights,
FD with its bootstrap spread (``metrics.sample_quality``). Each row is written to the JSON file
as soon as it is done, and a rerun skips the rows already there; training saves a resumable
checkpoint every 500 steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

import common

RUNS = common.REPO / "runs" / "edm"
CHURN = dict(S_churn=80.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.003)   # EDM's settings for ImageNet-64's ADM


def make_trainer(data, labels, device, edm: bool):
    """The cpu preset's Trainer, or the same with EDM's noise levels and loss: same init, data, recipe."""
    from ddpm_tutorial.config import PRESETS
    from ddpm_tutorial.edm import P_MEAN, P_STD, EDMDenoiser, edm_loss
    from ddpm_tutorial.train import Trainer, build_trainer, finite_loss, step_generator

    class EDMTrainer(Trainer):
        """The preset's Trainer with EDM's training step: each image's sigma drawn log-normally
        from a generator seeded by (seed, step), its noise the eps the preset's step would use."""

        def __init__(self, base: Trainer):
            self.__dict__.update(base.__dict__)
            self.denoiser = EDMDenoiser(self.net)

        def train_step(self) -> float:
            x0, _, noise, _ = self.draw_batch()
            g = step_generator(self.cfg.seed + 1, self.step)
            sigma = (P_MEAN + P_STD * torch.randn(len(x0), generator=g)).exp().to(self.device)
            self.model.train()
            per_sample = edm_loss(self.denoiser, x0, sigma, noise, reduction="none")
            loss = per_sample.mean()
            value = finite_loss(loss, self.step)
            self.gradient_step(loss)
            self.ema.update_parameters(self.model)
            t = self.denoiser.time_input(sigma.log() / 4)          # the history's buckets: by noise level
            self.record(value, t, per_sample)
            return value

        def state(self, include_optimizer: bool = True) -> dict:
            return super().state(include_optimizer) | {"edm": {"sigma_data": self.denoiser.sigma_data,
                                                               "P_mean": P_MEAN, "P_std": P_STD}}

    base = build_trainer(PRESETS["cpu"], data, device, labels=labels)
    return EDMTrainer(base) if edm else base


def step_rate(data, labels, device, rounds: int, steps: int) -> dict:
    """Seconds per training step of the preset and of EDM, alternated round after round in this
    process (the machine's changing load hits both); medians and their ratio."""
    trainers = {"ddpm": make_trainer(data, labels, device, False), "edm": make_trainer(data, labels, device, True)}
    for tr in trainers.values():                    # warm-up: first calls allocate
        tr.train_step()
    times = {k: [] for k in trainers}
    for r in range(rounds):
        for name, tr in trainers.items():
            start = time.perf_counter()
            for _ in range(steps):
                tr.train_step()
            times[name].append((time.perf_counter() - start) / steps)
        common.log(f"    round {r + 1}: preset {times['ddpm'][-1] * 1000:.0f} ms/step, EDM {times['edm'][-1] * 1000:.0f} ms/step")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"rounds": rounds, "steps_per_round": steps, "seconds_per_step": times,
            "median_ddpm": med["ddpm"], "median_edm": med["edm"], "edm_over_ddpm_rate": med["ddpm"] / med["edm"]}


def train(args, device) -> None:
    from ddpm_tutorial.data import load_fashion_mnist
    path = Path(args.json)
    record = json.loads(path.read_text()) if path.exists() else {}
    data, labels = load_fashion_mnist(train=True)
    if "step_rate" not in record:
        common.log(f"[step rate] {args.rate_rounds} alternated rounds of {args.rate_steps} steps")
        record["step_rate"] = step_rate(data, labels, device, args.rate_rounds, args.rate_steps)
        common.write_json(path, record | common.run_record(device))
    if "checkpoint" in record:
        return common.log(f"[train] done before: {record['checkpoint']}")
    trainer = make_trainer(data, labels, device, True)
    ckpt = Path(args.checkpoint)
    if ckpt.exists():
        trainer.resume(ckpt)
        common.log(f"[train] resumed at step {trainer.step}")
    seconds = record.get("train_seconds_before_resume", 0.0)
    start = time.perf_counter()
    while trainer.step < args.steps:
        trainer.train_step()
        if trainer.step % 100 == 0:
            recent = trainer.history.loss[-100:]
            common.log(f"    step {trainer.step:5d}  loss {sum(recent) / len(recent):.4f}  "
                       f"{(time.perf_counter() - start) / 60:.1f} min")
        if trainer.step % 500 == 0 or trainer.step == args.steps:
            trainer.save(ckpt)
            record["train_seconds_before_resume"] = seconds + time.perf_counter() - start
            common.write_json(path, record | common.run_record(device))
    loss = trainer.history.loss[-100:]
    record |= {"checkpoint": str(ckpt),
               "steps": trainer.step, "train": dataclasses.asdict(trainer.cfg),
               "train_seconds": seconds + time.perf_counter() - start, "final_loss": sum(loss) / len(loss),
               "bucket_loss": trainer.history.bucket_means()}
    common.write_json(path, record | common.run_record(device))


def draw_edm(denoiser, n: int, steps: int, seed: int, device, churn: bool, batch: int = 250):
    """n samples with edm.edm_sample (Heun, ``steps`` steps) from the x_T that seed gives, as
    ``common.draw_samples`` draws it for DDIM; churn noise from the same generator. (images, seconds)."""
    from ddpm_tutorial.edm import edm_sample
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn((n, 1, 28, 28), generator=generator)

    def run():
        return torch.cat([edm_sample(denoiser, len(x), steps, generator=generator, x_T=x, device=device,
                                     progress=False, **(CHURN if churn else {})).images
                          for x in x_T.split(batch)])
    return common.timed(run, device)


def sweep(args, device, denoiser, model, schedule, plan: list, path: Path, what: str) -> None:
    """Score every (sampler, calls) of ``plan`` not yet in ``path``; write after each row."""
    from ddpm_tutorial.edm import network_calls
    from ddpm_tutorial.metrics import sample_quality
    record = json.loads(path.read_text()) if path.exists() else {"rows": []}
    done = {(r["sampler"], r["calls"]) for r in record["rows"]}
    for sampler, calls in plan:
        if (sampler, calls) in done:
            continue
        common.log(f"[{what}] {sampler}, {calls} network calls, n={args.n} ...")
        if sampler.startswith("Heun"):
            steps = (calls + 1) // 2
            assert network_calls(steps) == calls, calls
            images, seconds = draw_edm(denoiser, args.n, steps, args.seed, device, churn="churn" in sampler)
        else:
            method, eta = {"DDIM (eta 0)": ("ddim", 0.0), "DDIM (eta 1)": ("ddim", 1.0),
                           "DPM-Solver++(2M)": ("dpm++2m", 0.0)}[sampler]
            images, seconds = common.draw_samples(model, schedule, method, args.n, calls, args.seed, device, eta=eta)
        row = {"sampler": sampler, "calls": calls, "n": args.n, "seconds": seconds, "seed": args.seed,
               **sample_quality(images, n_boot=args.n_boot).as_dict()}
        common.log(f"    FD {common.fd_cell(row)}, {seconds:.0f} s")
        record["rows"].append(row)
        common.write_json(path, record | {"what": what} | common.run_record(device))


def shipped(args, device) -> None:
    from ddpm_tutorial.checkpoint import model_from_checkpoint, shipped_checkpoint_path
    from ddpm_tutorial.edm import DDPMDenoiser
    model, schedule, _ = model_from_checkpoint(shipped_checkpoint_path(), device=device)
    plan = [(s, c) for c in args.calls for s in ("Heun", "Heun + churn", "DDIM (eta 0)", "DDIM (eta 1)",
                                                 "DPM-Solver++(2M)")] + [("DDIM (eta 1)", 50)]
    sweep(args, device, DDPMDenoiser(model, schedule), model, schedule, plan, Path(args.json),
          "the shipped cpu checkpoint (DDPM, L_simple, 3,800 steps)")


def score(args, device) -> None:
    from ddpm_tutorial.checkpoint import load_checkpoint, model_from_checkpoint
    from ddpm_tutorial.edm import EDMDenoiser
    ckpt = load_checkpoint(args.checkpoint)
    if "edm" not in ckpt:
        raise SystemExit(f"{args.checkpoint} was not trained by `bench/edm.py train` (no 'edm' entry)")
    model, _, _ = model_from_checkpoint(ckpt, device=device)
    denoiser = EDMDenoiser(model, sigma_data=ckpt["edm"]["sigma_data"])
    plan = [(s, c) for c in args.calls for s in ("Heun", "Heun + churn")]
    sweep(args, device, denoiser, None, None, plan, Path(args.json),
          f"the cpu network trained the EDM way ({ckpt['step']} steps)")


def noise_levels() -> None:
    """Where each recipe puts its training noise: DDPM's t ~ U{1..T} on the linear schedule,
    read as sigma_t = sqrt((1 - bar-alpha_t) / bar-alpha_t), against EDM's ln(sigma) ~ N(P_mean, P_std^2)."""
    import math
    from ddpm_tutorial.edm import P_MEAN, P_STD
    from ddpm_tutorial.schedules import make_schedule
    alpha_bar = make_schedule("linear").alpha_bar.double()
    sigma_t = ((1 - alpha_bar) / alpha_bar).sqrt()
    edm = torch.distributions.Normal(P_MEAN, P_STD)
    edges = [0.0, math.exp(P_MEAN - P_STD), math.exp(P_MEAN + P_STD), 10.0, math.inf]
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        ddpm = ((sigma_t >= lo) & (sigma_t < hi)).double().mean().item()
        cdf = [edm.cdf(torch.tensor(math.log(v))).item() if 0 < v < math.inf else float(v > 0) for v in (lo, hi)]
        rows.append([f"{lo:.3g} to {hi:.3g}", f"{100 * ddpm:.1f} %", f"{100 * (cdf[1] - cdf[0]):.1f} %"])
    print(f"\ntraining noise levels (DDPM: sigma_t from {sigma_t[0]:.4f} to {sigma_t[-1]:.1f}, median "
          f"{sigma_t.median():.2f}; EDM: median {math.exp(P_MEAN):.2f})")
    common.print_table(["sigma", "DDPM, t ~ U{1..T}", f"EDM, ln sigma ~ N({P_MEAN}, {P_STD}^2)"], rows)


def report(args) -> None:
    from ddpm_tutorial.metrics import SampleQuality, fd_difference
    noise_levels()
    files = {p.stem: json.loads(p.read_text()) for p in sorted(Path(args.out).glob("*.json"))}
    if "train" in files:
        t = files["train"]
        common.print_header([t])
        r = t["step_rate"]
        print(f"\nstep rate: preset {1000 * r['median_ddpm']:.0f} ms/step, EDM {1000 * r['median_edm']:.0f} ms/step "
              f"(median of {r['rounds']} alternated rounds of {r['steps_per_round']}): EDM / preset speed "
              f"{r['edm_over_ddpm_rate']:.3f}")
        if "train_seconds" in t:
            print(f"EDM training: {t['steps']} steps in {t['train_seconds'] / 60:.1f} min, final loss "
                  f"{t['final_loss']:.4f}")

    def quality(row):
        return SampleQuality(**{f.name: row[f.name] for f in dataclasses.fields(SampleQuality)})

    rows = {}
    for name in ("shipped", "edm_scores"):
        if name not in files:
            continue
        f = files[name]
        print(f"\n### {f['what']}\n")
        common.print_header([f])
        for r in f["rows"]:
            rows[(name, r["sampler"], r["calls"])] = r
        samplers = list(dict.fromkeys(r["sampler"] for r in f["rows"]))
        calls = sorted({r["calls"] for r in f["rows"]})
        table = [[s] + [common.fd_cell(rows[(name, s, c)]) if (name, s, c) in rows else "" for c in calls]
                 for s in samplers]
        common.print_table(["sampler \\ network calls", *map(str, calls)], table)
    if "shipped" in files:
        for against in ("DDIM (eta 0)", "DDIM (eta 1)"):
            print(f"\nHeun on the shipped network against {against} at the same calls "
                  "(difference ± its spread; 'beyond' = more than two spreads):")
            for (name, s, c), r in rows.items():
                ref = rows.get(("shipped", against, c))
                if name == "shipped" and s.startswith("Heun") and ref:
                    d, sp, beyond = fd_difference(quality(r), quality(ref))
                    print(f"  {s}, {c} calls: {d:+.1f} ± {sp:.1f} ({abs(d) / sp:.1f} spreads){' beyond' if beyond else ''}")
    if "shipped" in files and "edm_scores" in files:
        best_ddpm = min((r for (n, _, c), r in rows.items() if n == "shipped" and c <= 50), key=lambda r: r["fd"])
        best_edm = min((r for (n, _, c), r in rows.items() if n == "edm_scores" and c <= 50), key=lambda r: r["fd"])
        d, sp, beyond = fd_difference(quality(best_edm), quality(best_ddpm))
        print(f"\nbest <= 50 calls: EDM-trained {best_edm['sampler']} {best_edm['calls']}: {common.fd_cell(best_edm)}; "
              f"preset {best_ddpm['sampler']} {best_ddpm['calls']}: {common.fd_cell(best_ddpm)}; "
              f"difference {d:+.1f} ± {sp:.1f} ({abs(d) / sp:.1f} spreads){': beyond two' if beyond else ''}")
        for (n, s, c), r in rows.items():
            same = rows.get(("shipped", s, c))
            if n == "edm_scores" and same:
                d, sp, beyond = fd_difference(quality(r), quality(same))
                print(f"  EDM-trained {s} {c} calls vs the preset with the same sampler: {d:+.1f} ± {sp:.1f} "
                      f"({abs(d) / sp:.1f} spreads){' beyond' if beyond else ''}")
        for (n, s, c), r in rows.items():
            if n == "edm_scores":
                d, sp, beyond = fd_difference(quality(r), quality(best_ddpm))
                print(f"  EDM-trained {s} {c} calls vs the preset's best: {d:+.1f} ± {sp:.1f} "
                      f"({abs(d) / sp:.1f} spreads){' beyond' if beyond else ''}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("shipped", "train", "score", "all", "report"))
    p.add_argument("--n", type=int, default=500, help="samples scored per row")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (x_T)")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples behind each FD spread")
    p.add_argument("--steps", type=int, default=None, help="EDM training steps (default: the cpu preset's)")
    p.add_argument("--out", default=str(RUNS), help="where the JSON records and the EDM checkpoint go")
    p.add_argument("--calls", type=int, nargs="+", default=[19, 25, 35, 49],
                   help="network calls per sampler (odd: Heun with N steps makes 2N - 1)")
    p.add_argument("--rate-rounds", type=int, default=4, help="alternated rounds timing EDM's step against the preset's")
    p.add_argument("--rate-steps", type=int, default=10, help="training steps per timing round")
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = p.parse_args()
    if args.phase == "report":
        return report(args)
    from ddpm_tutorial.config import PRESETS
    args.steps = args.steps or PRESETS["cpu"].train.steps
    if any(c % 2 == 0 for c in args.calls):
        p.error(f"--calls must be odd (Heun with N steps makes 2N - 1 network calls), got {args.calls}")
    device = common.setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.checkpoint = str(out / "edm_cpu.pt")
    phases = ("train", "score", "shipped") if args.phase == "all" else (args.phase,)
    for phase in phases:
        args.json = str(out / {"train": "train.json", "score": "edm_scores.json", "shipped": "shipped.json"}[phase])
        {"train": train, "score": score, "shipped": shipped}[phase](args, device)
    report(args)


if __name__ == "__main__":
    main()
