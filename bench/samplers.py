"""Sampling steps against quality for one checkpoint: DDPM-1000, DDIM and DPM-Solver++(2M).
Prints a markdown table (and JSON with --json); asserts nothing.

    python bench/samplers.py                                  # the shipped checkpoint, n=500
    python bench/samplers.py --n 200 --ddpm-n 50 --plot sweep.png
    python bench/samplers.py --checkpoint q-ours.ours-cpu.pt  # weights kept by bench/quality.py --json
    python bench/samplers.py --from-json sweep.json --plot sweep.png

Every row samples from the same x_T (seed ``--seed``) and is scored by ``sample_quality`` at its
n, with a bootstrap spread. DDPM's 1000 steps cost 10-100x the others: on a CPU give that row
fewer samples (``--ddpm-n``); its FD then compares only with rows and floors at the same n.
Issue 14's target: at most 50 network calls within 10% of DDPM-1000's FD (last column).
"""
from __future__ import annotations

import argparse

import common

NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpm++2m": "DPM-Solver++(2M)"}


def sweep(model, schedule, args, device) -> list:
    """One row per (sampler, steps): DDPM-1000 first, so later rows can be read against it."""
    from ddpm_tutorial.metrics import sample_quality
    ddpm_n = args.n if args.ddpm_n is None else args.ddpm_n
    plan = ([("ddpm", 1000, ddpm_n)] if ddpm_n else []) + [("ddim", s, args.n) for s in args.ddim_steps] + \
        [("dpm++2m", s, args.n) for s in args.dpm_steps]
    rows = []
    for method, steps, n in plan:
        common.log(f"    {NAMES[method]} {steps} steps, n={n} ...")
        eta = args.eta if method == "ddim" else 0.0
        images, seconds = common.draw_samples(model, schedule, method, n, steps, args.seed, device,
                                              clip_x0=args.clip_x0, eta=eta)
        name = NAMES[method] + (f" (eta {eta:g})" if eta else "")
        rows.append({"sampler": name, "steps": steps, "n": n, "seconds": seconds,
                     "mean_pixel": (images.mean().item() + 1) / 2,     # in [0, 1]; the data's: 0.286
                     **sample_quality(images, n_boot=args.n_boot).as_dict()})
        common.log(f"    FD {common.fd_cell(rows[-1])}, {seconds:.1f} s")
    return rows


def print_sweep(result: dict) -> None:
    common.print_header([result])
    print(f"checkpoint: {result['checkpoint']} ({result['train_steps']} training steps), seed {result['seed']}")
    rows = result["rows"]
    ddpm = {r["n"]: r["fd"] for r in rows if r["sampler"] == "DDPM"}
    common.print_table(
        ["sampler", "steps (network calls)", "n", "seconds", "ms / image", "FD ± std", "floor (real)",
         "ceiling (noise)", "mean pixel", "FD / FD(DDPM-1000)"],
        [[r["sampler"], r["steps"], r["n"], f"{r['seconds']:.1f}", f"{1000 * r['seconds'] / r['n']:.1f}",
          common.fd_cell(r), f"{r['fd_real']:.2f}", f"{r['fd_noise']:.1f}", f"{r.get('mean_pixel', float('nan')):.3f}",
          f"{r['fd'] / ddpm[r['n']]:.2f}" if r["n"] in ddpm else "n/a"] for r in rows])
    if len({r["n"] for r in rows}) > 1:
        print("\nCompare FD only between rows of equal n (its bias depends on n).")


def plot_sweep(rows: list, path: str) -> None:
    """FD (± spread) against sampling ms per image, one line per sampler, floors dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for (sampler, color) in zip(NAMES.values(), ("C3", "C0", "C2")):
        mine = [r for r in rows if r["sampler"] == sampler]
        if not mine:
            continue
        ms = [1000 * r["seconds"] / r["n"] for r in mine]
        ax.errorbar(ms, [r["fd"] for r in mine], yerr=[r["fd_std"] for r in mine], fmt="o-", color=color,
                    capsize=2, label=f"{sampler} (n={', '.join(str(n) for n in sorted({r['n'] for r in mine}))})")
        for x, r in zip(ms, mine):
            ax.annotate(str(r["steps"]), (x, r["fd"]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8, color=color)
    for n in sorted({r["n"] for r in rows}):
        floor = next(r["fd_real"] for r in rows if r["n"] == n)
        ax.axhline(floor, color="grey", ls=":", lw=1)
        ax.text(1.0, floor, f" real vs real\n n={n}", transform=ax.get_yaxis_transform(), fontsize=7,
                color="grey", va="center")
    ax.legend(fontsize=8, title="sampler (network calls above points)", title_fontsize=8)
    ax.set(xscale="log", xlabel="sampling ms per image (log)", ylabel="Fréchet distance (classifier features)",
           title="Sampling steps against quality")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    common.log(f"plot: {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="shipped", help="a checkpoint file, or 'shipped' (the package's)")
    p.add_argument("--n", type=int, default=500, help="samples per DDIM / DPM-Solver row")
    p.add_argument("--ddpm-n", type=int, default=None, help="samples for the DDPM-1000 row (default --n; 0: none)")
    p.add_argument("--ddim-steps", type=int, nargs="*", default=[10, 20, 50, 100])
    p.add_argument("--dpm-steps", type=int, nargs="*", default=[10, 20, 50])
    p.add_argument("--seed", type=int, default=0, help="sampling seed (x_T and DDPM's noise)")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples behind each FD spread")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta for the DDIM rows (0: deterministic)")
    p.add_argument("--clip-x0", action="store_true", help="clamp each step's hat-x_0 to [-1, 1] (every sampler)")
    p.add_argument("--plot", metavar="PNG", help="also plot FD against sampling time here")
    p.add_argument("--from-json", metavar="FILE", help="print (and plot) an earlier --json file")
    common.add_run_args(p)
    args = p.parse_args()
    if args.from_json:
        result = common.read_json([args.from_json], key="sweeps")[0]
    else:
        from ddpm_tutorial.checkpoint import model_from_checkpoint, shipped_checkpoint_path
        device = common.setup(args)
        path = shipped_checkpoint_path() if args.checkpoint == "shipped" else args.checkpoint
        model, schedule, ckpt = model_from_checkpoint(path, device=device)
        common.log(f"[{path}] {ckpt['step']} training steps")
        result = {"checkpoint": str(path), "train_steps": ckpt["step"], "seed": args.seed, "clip_x0": args.clip_x0,
                  "rows": sweep(model, schedule, args, device)} | common.run_record(device)
        common.write_json(args.json, {"sweeps": [result]})
    print_sweep(result)
    if args.plot:
        plot_sweep(result["rows"], args.plot)


if __name__ == "__main__":
    main()
