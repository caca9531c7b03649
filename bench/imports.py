"""Where a worker's start spends its import time (a measuring tool, not a test).

The renderer's load begins with importing torch, diffusers and transformers (`load_stages_s`
"imports"; the Z-Image classes, which diffusers imports lazily, count under "read"). On the lent H100
machines that stage took 14.7-15.4 s against 4-5 s on the 2-core development machine, and why was
not found. This runs the same imports in fresh interpreters under `python -X importtime`, `--runs`
times (the first on a cold page cache, if the machine is fresh), and prints for each run the wall
time, the own time summed per top-level package, and the slowest single modules by own time.

  python -m bench.imports [--runs 2] [--top 12] [--jsonl FILE]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time

from bench.profiles import emit

# What DiffusionRenderer.load imports before it reads weights, then the pipeline class it reads them with.
IMPORTS = "import torch; import diffusers; import transformers; from diffusers import ZImagePipeline"
_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)\s*$")


def parse_importtime(text: str) -> list[tuple[str, float, float]]:
    """(module, own s, cumulative s) for each line `python -X importtime` wrote to stderr."""
    rows = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            rows.append((match.group(4), int(match.group(1)) / 1e6, int(match.group(2)) / 1e6))
    return rows


def summarise(rows: list[tuple[str, float, float]], top: int) -> dict:
    """Own time per top-level package, largest first, and the `top` slowest modules by own time."""
    by_package: dict[str, float] = {}
    for module, own_s, _ in rows:
        package = module.split(".")[0]
        by_package[package] = by_package.get(package, 0.0) + own_s
    packages = sorted(by_package.items(), key=lambda kv: -kv[1])[:top]
    slowest = sorted(rows, key=lambda r: -r[1])[:top]
    return {"own_s_by_package": {name: round(s, 3) for name, s in packages},
            "slowest_modules": [{"module": m, "own_s": round(own, 3), "cumulative_s": round(cum, 3)}
                                for m, own, cum in slowest],
            "modules": len(rows), "own_s_total": round(sum(r[1] for r in rows), 3)}


def measure(top: int, imports: str = IMPORTS) -> dict:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", imports], capture_output=True, text=True)
    wall_s = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"the imports failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return {"imports": imports, "wall_s": round(wall_s, 2), **summarise(parse_importtime(done.stderr), top)}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--jsonl", default="")
    args = ap.parse_args(argv)
    machine = {"host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
               "versions": {name: _version(name) for name in ("torch", "diffusers", "transformers")},
               # Where byte-compiled modules are read from, and whether new ones may be written: with
               # neither a compiled install nor writing allowed, every import compiles from source.
               "pycache_prefix": sys.pycache_prefix, "dont_write_bytecode": sys.dont_write_bytecode}
    for run in range(1, args.runs + 1):
        emit({"tool": "imports", "run": run, **machine, **measure(args.top)}, args.jsonl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
