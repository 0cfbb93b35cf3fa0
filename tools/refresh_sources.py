"""Keep the package source the chapters display (``viz.show_source(obj)``) equal to the package.

    python tools/refresh_sources.py --check notebooks/*.ipynb   # exit 1 and name each stale cell
    python tools/refresh_sources.py notebooks/*.ipynb           # rewrite stale outputs in place

A chapter's output is written when it runs; a later change to the package (a renamed helper,
a new line in ``Trainer.train_step``) would leave the committed page showing old code. The
displayed text is exactly what ``show_source`` renders, so it can be regenerated without
re-running the chapter, and checked by a test (tests/test_notebooks_meta.py).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import nbformat

import ddpm_tutorial

CALL = re.compile(r"^\s*(?:viz\.)?show_source\(([\w.]+)\)\s*$", re.M)


def namespace() -> dict:
    """Every module of the package by its short name, and every public name each one defines."""
    ns = {}
    for info in pkgutil.iter_modules(ddpm_tutorial.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"ddpm_tutorial.{info.name}")
        ns[info.name] = module
        ns.update({k: v for k, v in vars(module).items()
                   if not k.startswith("_") and getattr(v, "__module__", "").startswith("ddpm_tutorial")})
    return ns


def rendered(obj) -> str:
    """The markdown ``viz.show_source`` displays for ``obj``."""
    return f"```python\n{inspect.getsource(obj).rstrip()}\n```"


def stale_cells(nb: dict, ns: dict) -> list:
    """(cell index, expression, output dict, fresh text) of every show_source output that differs."""
    found = []
    for i, cell in enumerate(nb.cells):
        exprs = CALL.findall(cell.source) if cell.cell_type == "code" else []
        outputs = [o for o in cell.get("outputs", []) if o.get("data", {}).get("text/markdown", "").startswith("```python\n")]
        if len(outputs) != len(exprs):
            raise ValueError(f"cell {i}: {len(exprs)} show_source calls but {len(outputs)} source outputs")
        for expr, output in zip(exprs, outputs):     # one output per call, in call order
            fresh = rendered(eval(expr, {}, ns))     # a dotted name of the package, nothing else
            if output["data"]["text/markdown"] != fresh:
                found.append((i, expr, output, fresh))
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--check", action="store_true", help="only report stale cells (exit 1 if any)")
    args = p.parse_args(argv)
    ns, stale = namespace(), 0
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        found = stale_cells(nb, ns)
        for i, expr, output, fresh in found:
            print(f"{path}: cell {i} shows an old source of {expr}")
            output["data"]["text/markdown"] = fresh
        stale += len(found)
        if found and not args.check:
            nbformat.write(nb, path)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
