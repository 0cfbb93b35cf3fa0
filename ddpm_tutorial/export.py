"""Export the trained network for the book's in-browser demo ("Try it" page).

Two files, both made from one checkpoint:

- ``model.onnx``: the U-Net eps_theta(x_t, t), inputs ``x_t`` (B, 1, 28, 28) float32 and
  ``t`` (B,) int64 (code index 0..T-1), output ``eps`` (B, 1, 28, 28); B is a dynamic axis.
  A class-conditional network (``ModelConfig.num_classes`` = K > 0) takes a third input
  ``y`` (B,) int64: a class index in [0, K), or K for the null class (the unconditional
  model). The page then does classifier-free guidance as ``sampling.guided_eps`` does: one
  call on a doubled batch (2B) of the class and the null class.
- ``schedule.json``: T, bar-alpha_t for every t, and the DDIM sub-sequences tau for each
  step count the page offers, taken from :func:`ddpm_tutorial.sampling.ddim_timesteps`;
  for a conditional network also K, the null class's index and the class names.
  The browser reads these numbers instead of recomputing the schedule, so the JavaScript
  sampler cannot drift from the Python one.

The page then runs DDIM (Song et al. 2021, Eq. 12) in JavaScript with these numbers:

    hat-x_0 = (x_t - sqrt(1 - bar-alpha_t) eps_theta) / sqrt(bar-alpha_t)
    x_s     = sqrt(bar-alpha_s) hat-x_0 + sqrt(1 - bar-alpha_s - sigma^2) eps_theta + sigma z

Command line: ``python -m ddpm_tutorial export-onnx [--checkpoint PT] --out model.onnx``
(the book's page uses the shipped conditional checkpoint, :data:`DEMO_CHECKPOINT`).
Needs the ``onnx`` package (the ``book`` extra), which torch's ONNX exporter imports.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import torch

from .checkpoint import model_from_checkpoint, shipped_checkpoint_path
from .data import CLASSES
from .outputs import check_outputs, what_is_left, write_file
from .sampling import ddim_timesteps

SCHEDULE_FORMAT = "ddpm_tutorial/schedule/1"
STEPS_RANGE = (10, 100)   # DDIM step counts the page offers (its slider's range)
OPSET = 20                # onnxruntime-web >= 1.17 runs opset 20
# Opsets this network exports to: attention's scaled_dot_product needs 14; 20 is the newest
# torch's TorchScript exporter writes and onnxruntime-web 1.17 runs.
OPSET_RANGE = (14, 20)
# What the book's "Try it" page runs: chapter 7's class-conditional network (its null class is
# the unconditional model), so the reader can ask for a class and set the guidance w.
DEMO_CHECKPOINT = "ddpm_fashion_cpu_cond.pt"


def export_onnx(model: torch.nn.Module, path, opset: int = OPSET) -> Path:
    """Write eps_theta(x_t, t[, y]) to ``path`` as one self-contained ONNX file, batch axis dynamic.

    Inputs ``x_t`` (B, C, H, W) float32 and ``t`` (B,) int64; a conditional network
    (``config.num_classes`` = K > 0) also ``y`` (B,) int64 in [0, K] (K: the null class).

    torch's TorchScript tracer (``dynamo=False``) records the graph by running the network
    once, at batch 2 so that no size is mistaken for a constant 1. The forward's Python-side
    input checks (t in [0, T), which reads t's values) run on those example inputs and stay
    out of the graph. torch.export (``dynamo=True``) refuses such value-reading checks, and
    the graph does not need them: the page only sends t from the exported tau sequences.
    The example labels are one real class and the null class, so both rows of the class
    table are looked up while tracing (the lookup is one Gather either way).
    """
    check_opset(opset)
    cfg = model.config
    x = torch.zeros(2, cfg.in_channels, cfg.image_size, cfg.image_size)   # (B, C, H, W)
    t = torch.tensor([0, 1], dtype=torch.long)                            # (B,)
    inputs, names = (x, t), ["x_t", "t"]
    if cfg.num_classes:
        inputs, names = (x, t, torch.tensor([0, cfg.num_classes], dtype=torch.long)), names + ["y"]
    model = model.cpu().eval()
    graph = io.BytesIO()             # traced in memory: the file is written whole, or not at all
    with warnings.catch_warnings():  # the tracer's deprecation note and its notes on the checks
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, graph, input_names=names, output_names=["eps"],
                          dynamic_axes={name: {0: "batch"} for name in names + ["eps"]},
                          opset_version=opset, dynamo=False)
    return write_file(path, lambda f: f.write(graph.getvalue()), need=graph.tell())


def check_opset(opset) -> None:
    lo, hi = OPSET_RANGE
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise ValueError(f"--opset must be an integer in [{lo}, {hi}] (attention needs {lo}; the page's "
                         f"onnxruntime-web runs up to {hi}), got {opset!r}; the default is {OPSET}")


def class_info(model_config, class_names=None) -> dict:
    """The class fields of schedule.json: {} for an unconditional network, else
    ``num_classes`` K, ``null_class`` (= K, the label of the unconditional branch) and
    ``class_names`` (K names; default: Fashion-MNIST's when K = 10 on 28x28 gray images,
    else "class 0", "class 1", ...)."""
    K = model_config.num_classes
    if not K:
        return {}
    if class_names is None:
        fashion = K == len(CLASSES) and model_config.in_channels == 1 and model_config.image_size == 28
        class_names = CLASSES if fashion else [f"class {k}" for k in range(K)]
    if len(class_names) != K:
        raise ValueError(f"class_names must name the network's {K} classes, got {len(class_names)}")
    return {"num_classes": K, "null_class": K, "class_names": list(class_names)}


def schedule_coefficients(schedule, steps_range=STEPS_RANGE) -> dict:
    """What the browser's sampler needs, as plain JSON numbers.

    ``alpha_bar[t]`` is bar-alpha_t (Eq. 4) for code index t = 0..T-1, the exact float32
    values the Python sampler uses. ``ddim_timesteps[str(n)]`` is tau for n steps.
    """
    lo, hi = steps_range
    if schedule.prediction != "eps":   # the page's JavaScript sampler reads its output as eps
        raise ValueError(f"the in-browser demo runs eps-prediction models only; this checkpoint's network "
                         f"predicts {schedule.prediction!r}")
    if not 1 <= lo <= hi <= schedule.T:
        raise ValueError(f"steps_range must satisfy 1 <= lo <= hi <= T={schedule.T}, got {steps_range}")
    return {
        "format": SCHEDULE_FORMAT,
        "T": schedule.T,
        "alpha_bar": [float(a) for a in schedule.alpha_bar.float().cpu()],  # float32 -> exact in JSON
        "steps_range": [lo, hi],
        "ddim_timesteps": {str(n): ddim_timesteps(schedule.T, n) for n in range(lo, hi + 1)},
    }


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_files(model_path, json_path, checkpoint=None, opset: int = OPSET, class_names=None) -> dict:
    """Export ``checkpoint`` (None: the shipped unconditional one) to ``model_path`` (ONNX) and
    ``json_path`` (:func:`schedule_coefficients`, :func:`class_info` and where the weights
    came from). Returns the JSON's contents."""
    ckpt_path = Path(checkpoint) if checkpoint else shipped_checkpoint_path()
    model, schedule, ckpt = model_from_checkpoint(ckpt_path)
    classes = class_info(model.config, class_names)      # checked before the export's seconds
    info = {**schedule_coefficients(schedule), **classes, "checkpoint": ckpt_path.name,   # refuses v before
            "checkpoint_sha256": file_sha256(ckpt_path), "checkpoint_step": int(ckpt.get("step", 0)),  # writing
            "image_size": model.config.image_size, "in_channels": model.config.in_channels}
    export_onnx(model, model_path, opset=opset)
    _write_json(json_path, info, left=f"{what_is_left(json_path, f'{json_path} was not written')}, while "
                                      f"{model_path} was written: the two belong together, so free some space "
                                      "and export again")
    return info


def _write_json(path, info: dict, left: str | None = None) -> None:
    write_file(path, lambda f: f.write(json.dumps(info, separators=(",", ":")).encode()), left=left)


def export_key(checkpoint=None) -> str:
    """sha256 over what the exported files depend on: the checkpoint's bytes, the network's
    source (unet.py, embeddings.py), this file, and the torch version."""
    h = hashlib.sha256(file_sha256(Path(checkpoint) if checkpoint else shipped_checkpoint_path()).encode())
    here = Path(__file__).parent
    for name in ("unet.py", "embeddings.py", "export.py"):
        h.update((here / name).read_bytes())
    h.update(torch.__version__.encode())
    return h.hexdigest()


def export_demo(out_dir, checkpoint=None, force: bool = False) -> dict:
    """``model.onnx`` and ``schedule.json`` in ``out_dir``, as the book build wants them.

    Nothing is exported again when the JSON there records the same :func:`export_key`
    (an export takes seconds and the book build asks on every build).
    """
    out_dir = Path(out_dir)
    model_path, json_path = out_dir / "model.onnx", out_dir / "schedule.json"
    key = export_key(checkpoint)
    if not force and model_path.is_file() and json_path.is_file():
        old = json.loads(json_path.read_text())
        if old.get("format") == SCHEDULE_FORMAT and old.get("export_key") == key:
            return old
    info = export_files(model_path, json_path, checkpoint)
    info["export_key"] = key
    _write_json(json_path, info)
    return info


def _export_cli(args) -> None:
    out = Path(args.out)
    json_path = Path(args.schedule_json) if args.schedule_json else out.with_name("schedule.json")
    check_opset(args.opset)
    check_outputs({"--out": out, "--schedule-json": json_path},
                  inputs={"--checkpoint": args.checkpoint or shipped_checkpoint_path()}, force=args.force,
                  examples={"--out": "model.onnx", "--schedule-json": "schedule.json"})
    info = export_files(out, json_path, args.checkpoint, opset=args.opset)
    signature = "eps_theta(x_t, t, y)" if info.get("num_classes") else "eps_theta(x_t, t)"
    print(f"wrote {out} ({out.stat().st_size:,} bytes): {signature}, batch axis dynamic")
    lo, hi = info["steps_range"]
    classes = f", {info['num_classes']} classes (y = {info['null_class']}: the null class)" if info.get("num_classes") else ""
    print(f"wrote {json_path}: T = {info['T']}, alpha_bar, DDIM timesteps for {lo}-{hi} steps{classes}")


def add_parser(subparsers) -> None:
    """Register ``export-onnx`` on the CLI's subparsers (``python -m ddpm_tutorial export-onnx``)."""
    e = subparsers.add_parser("export-onnx", help="export eps_theta to ONNX and the schedule to JSON "
                                                  "(the book's in-browser demo)")
    e.add_argument("--checkpoint", default=None, help="default: the checkpoint shipped with the package")
    e.add_argument("--out", default="model.onnx", help="ONNX file to write (default model.onnx)")
    e.add_argument("--schedule-json", dest="schedule_json", default=None,
                   help="schedule coefficients file (default: schedule.json beside --out)")
    e.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset, {OPSET_RANGE[0]}-{OPSET_RANGE[1]} "
                   f"(default {OPSET})")
    e.add_argument("--force", action="store_true", help="overwrite existing files at --out / --schedule-json")
    e.set_defaults(func=_export_cli)
