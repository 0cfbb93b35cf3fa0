"""Sphinx extension: put the in-browser demo's files into the built site (book/try_it.md).

After every successful HTML build, into ``_build/html/_static/demo/``:

1. ``model.onnx`` and ``schedule.json``, exported from the shipped class-conditional
   checkpoint (:data:`ddpm_tutorial.export.DEMO_CHECKPOINT`, chapter 8's network; its null
   class is the unconditional model) by :func:`ddpm_tutorial.export.export_demo` (kept in
   ``_build/demo_export`` and exported again only when the checkpoint, the network's code or
   torch change);
2. ``ort/``: the WebAssembly build of onnxruntime-web, copied from ``node_modules`` (which
   ``make book`` and ``make test`` fill with ``npm ci``; the version is pinned in
   package-lock.json), with its licence beside it;
3. ``ddpm_demo.js`` (the page's script) and ``manifest.json``: which of these are there,
   their sizes, the class names (the page's class picker is drawn before the model loads),
   and, for anything missing, why. The page reads the manifest and shows that reason in
   place of the demo. Nothing here is committed to git.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from sphinx.util import logging

logger = logging.getLogger(__name__)
HERE = Path(__file__).parent
# What the page needs of onnxruntime-web: the WebAssembly-only bundle (no WebGL/WebGPU code),
# the Emscripten loader it imports, and the SIMD WebAssembly binary.
RUNTIME_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
NO_NPM = ("this site was built without npm, so the ONNX Runtime Web files it runs on were not "
          "installed. Rebuild it with Node.js and npm present: 'make book' runs 'npm ci'.")


def copy_runtime(root: Path, dest: Path) -> dict:
    """Copy onnxruntime-web's files and licence into ``dest``; returns {"version", "files"}
    or {"missing": reason}."""
    pkg = root / "node_modules" / "onnxruntime-web"
    if not (pkg / "package.json").is_file():
        return {"missing": NO_NPM}
    version = json.loads((pkg / "package.json").read_text())["version"]
    lock = json.loads((root / "package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/onnxruntime-web"]["version"]
    if version != pinned:
        return {"missing": f"node_modules holds onnxruntime-web {version} but package-lock.json "
                           f"pins {pinned}; run 'npm ci'."}
    dest.mkdir(parents=True, exist_ok=True)
    for name in RUNTIME_FILES:
        shutil.copyfile(pkg / "dist" / name, dest / name)
    write_licence(pkg, version, dest)
    return {"version": version, "files": {n: (dest / n).stat().st_size for n in RUNTIME_FILES}}


def write_licence(pkg: Path, version: str, dest: Path) -> None:
    """The npm package declares MIT (package.json) but carries no licence file. ONNX Runtime's
    Python distribution carries the project's LICENSE and ThirdPartyNotices; use those when
    it is installed (the test extra), else state the licence and where its text lives."""
    declared = json.loads((pkg / "package.json").read_text()).get("license", "MIT")
    header = (f"onnxruntime-web {version}, from the npm registry. Licence: {declared} (its package.json);\n"
              "Copyright (c) Microsoft Corporation. The npm package has no licence file of its own.\n")
    try:
        import onnxruntime
        ort_dir = Path(onnxruntime.__file__).parent
        text = (ort_dir / "LICENSE").read_text()
        shutil.copyfile(ort_dir / "ThirdPartyNotices.txt", dest / "ThirdPartyNotices.txt")
        header += (f"Below: ONNX Runtime's LICENSE, as shipped in its Python distribution "
                   f"(onnxruntime {onnxruntime.__version__}); third-party notices in ThirdPartyNotices.txt.\n\n")
    except (ImportError, OSError):
        text = "The MIT licence text: https://github.com/microsoft/onnxruntime/blob/main/LICENSE\n"
    (dest / "LICENSE.txt").write_text(header + text)


def export_model(cache: Path, dest: Path) -> dict:
    """Export (or reuse) model.onnx + schedule.json and copy them into ``dest``."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it; the book extra installs it)
    except ImportError:
        return {"missing": "the 'onnx' Python package was missing when this site was built, so "
                           "the network was not exported; 'pip install -e .[book]' installs it."}
    from ddpm_tutorial.checkpoint import shipped_checkpoint_path
    from ddpm_tutorial.export import DEMO_CHECKPOINT, export_demo
    info = export_demo(cache, checkpoint=shipped_checkpoint_path(DEMO_CHECKPOINT))
    dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in ("model.onnx", "schedule.json"):
        shutil.copyfile(cache / name, dest / name)
        files[name] = (dest / name).stat().st_size
    return {"files": files, "checkpoint": info["checkpoint"], "checkpoint_step": info.get("checkpoint_step"),
            "class_names": info.get("class_names"), "null_class": info.get("null_class")}


def build_demo(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    root, out = Path(app.srcdir), Path(app.outdir)
    dest = out / "_static" / "demo"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "ddpm_demo.js", dest / "ddpm_demo.js")
    model = export_model(out.parent / "demo_export", dest)
    runtime = copy_runtime(root, dest / "ort")
    parts = [model, runtime]
    weight = sum(size for p in parts for size in p.get("files", {}).values())
    weight += (dest / "ddpm_demo.js").stat().st_size
    manifest = {"model": model, "runtime": runtime, "page_weight_bytes": weight,
                "ready": not any("missing" in p for p in parts)}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    logger.info(f"in-browser demo: {'ready' if manifest['ready'] else 'NOT ready'}, "
                f"{weight / 1e6:.1f} MB to download"
                + "".join(f"; {p['missing']}" for p in parts if "missing" in p))


def setup(app):
    app.connect("build-finished", build_demo)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
