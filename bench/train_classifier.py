"""Train the Fashion-MNIST classifier behind ``ddpm_tutorial.metrics`` and ship its weights.

    python bench/train_classifier.py            # ~5 minutes on 2 CPU cores

Trains ``FashionClassifier`` on the 60k training images (random 2-pixel shifts
and horizontal flips), evaluates once on the 10k test images, fails below 92%
test accuracy, and writes atomically:

- ``ddpm_tutorial/assets/fmnist_classifier.pt``: a plain float32 state_dict;
- ``ddpm_tutorial/assets/fmnist_classifier.json``: accuracy, epochs, time, and the run record
  of ``bench/common.py`` (hardware, versions, commit, command).

The number of epochs is fixed in advance; the test split is never used to pick
a checkpoint (per-epoch test accuracy is only logged).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run without installing the package
import common                                                   # noqa: E402
from ddpm_tutorial.data import load_fashion_mnist               # noqa: E402
from ddpm_tutorial.metrics import WEIGHTS, FashionClassifier    # noqa: E402

MIN_ACCURACY = 0.92


def augment(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to ``shift`` pixels per image,
    filling with the background value -1. (B, 1, 28, 28) -> (B, 1, 28, 28)."""
    B, _, H, W = x.shape
    flip = torch.rand(B, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    xp = F.pad(x, (shift,) * 4, value=-1.0)                       # (B, 1, H+2s, W+2s)
    dy, dx = (torch.randint(0, 2 * shift + 1, (2, B), generator=gen))
    rows = (dy[:, None] + torch.arange(H))[:, :, None]            # (B, H, 1)
    cols = (dx[:, None] + torch.arange(W))[:, None, :]            # (B, 1, W)
    return xp[torch.arange(B)[:, None, None], 0, rows, cols][:, None]   # (B, 1, H, W)


@torch.inference_mode()
def accuracy(model: FashionClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum((model(xb).argmax(1) == yb).sum().item()
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / len(y)


def train(model, x, y, x_test, y_test, epochs, batch_size, lr, seed, shift=2, log=print) -> list[dict]:
    """AdamW with a one-cycle learning rate; returns one record per epoch."""
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(x) // batch_size                         # drop the last partial batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch)
    history, t0 = [], time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb = augment(x[idx], gen, shift).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        rec = {"epoch": epoch, "train_loss": round(total / steps_per_epoch, 4),
               "test_accuracy": round(accuracy(model, x_test, y_test), 4), "seconds": round(time.time() - t0, 1)}
        history.append(rec)
        log(json.dumps(rec))
    return history


def save_atomic(state: dict, record: dict, out: Path) -> None:
    """Write the weights and the JSON record via temporary files and os.replace."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    record["sha256"] = hashlib.sha256(tmp.read_bytes()).hexdigest()
    record["bytes"] = tmp.stat().st_size
    os.replace(tmp, out)
    js, js_tmp = out.with_suffix(".json"), out.with_suffix(".json.tmp")
    js_tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(js_tmp, js)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--shift", type=int, default=2, help="random shift in pixels (0: flips only)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--subset", type=int, default=0, help="train on the first N images only (smoke test)")
    p.add_argument("--out", type=Path, default=WEIGHTS)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x, y = load_fashion_mnist(train=True, subset=args.subset)
    x_test, y_test = load_fashion_mnist(train=False)
    model = FashionClassifier().to(memory_format=torch.channels_last)   # ~25% faster convs on CPU

    t0 = time.time()
    history = train(model, x, y, x_test, y_test, args.epochs, args.batch_size, args.lr, args.seed,
                    args.shift)
    seconds = time.time() - t0
    acc = history[-1]["test_accuracy"]
    print(f"test accuracy {acc:.4f} after {args.epochs} epochs, {seconds:.0f} s")
    if acc < MIN_ACCURACY and not args.subset:
        print(f"below the required {MIN_ACCURACY:.2f}; weights not written", file=sys.stderr)
        return 1

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}   # plain layout
    record = {
        "test_accuracy": acc, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "shift": args.shift, "seed": args.seed, "train_images": len(x), "test_images": len(x_test),
        "params": sum(p.numel() for p in model.parameters()), "feature_dim": model.head.in_features,
        "seconds": round(seconds, 1), "history": history,
    } | common.run_record("cpu")
    save_atomic(state, record, args.out)
    print(f"wrote {args.out} ({record['bytes'] / 1e6:.2f} MB) and {args.out.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
