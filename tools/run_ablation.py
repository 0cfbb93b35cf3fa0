"""Run (or finish) chapter 07's ablation for a preset into its cache, outside the notebook.

    python tools/run_ablation.py --preset cpu        # writes notebooks/runs/ablation_cpu.pt

The chapter calls the same ``ablation.run_ablation`` with the same cache, ``runs/`` beside the
notebook, so it reuses every finished run instead of training it again (an interrupted run
resumes where it stopped). The cache goes there from whatever folder this is started in.
"""
import argparse
import time
from pathlib import Path

from ddpm_tutorial import ablation
from ddpm_tutorial.config import get_preset
from ddpm_tutorial.data import load_fashion_mnist

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default=None, help="default: the one the hardware picks")
args = parser.parse_args()
preset = get_preset(args.preset)
data, _ = load_fashion_mnist(train=True, subset=preset.ablation.train.subset)
start = time.perf_counter()
cache = Path(__file__).resolve().parents[1] / "notebooks" / ablation.cache_path(preset)   # the chapter's runs/
results = ablation.run_ablation(preset, data, cache=cache)
print(f"{len(results)} runs in {(time.perf_counter() - start) / 60:.1f} min (cached runs take no time)")
for row in ablation.summarize(results):
    print(row)
