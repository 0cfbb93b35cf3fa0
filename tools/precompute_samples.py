"""Fill the sample cache of a chapter ahead of its full run, in the background.

Chapter 6 keeps every set of samples it makes under ``runs/samples/`` (``sample_cache.sample_set``),
named by the weights, the starting noise and the sampler's settings. This tool runs the chapter's
own code cells, in a kernel started in the chapter's folder as ``jupyter execute`` does, up to and
including the first cell that contains ``--until``, and throws the outputs away: the sets land in
the cache exactly as the chapter would name them, and the chapter's full run reads them back.

    OMP_NUM_THREADS=1 nohup python tools/precompute_samples.py notebooks/06_fast_sampling.ipynb \\
        --until "def pixel_stats(" > runs/precompute_06.log 2>&1 &

Run it after chapter 4 when chapter 4 is re-executed too: a retrained checkpoint has other
weights, hence other sets.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebook", type=Path)
    p.add_argument("--until", required=True, help="text of the last code cell to run")
    args = p.parse_args(argv)
    nb = nbformat.read(args.notebook, as_version=4)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    last = next((i for i in code if args.until in nb.cells[i].source), None)
    if last is None:
        p.error(f"no code cell of {args.notebook} contains {args.until!r}")
    nb.cells = [c for c in nb.cells[:last + 1] if c.cell_type == "code"]
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=None, resources={"metadata": {"path": str(args.notebook.parent.resolve())}}).execute()
    print(f"ran {len(nb.cells)} code cells of {args.notebook.name} in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
