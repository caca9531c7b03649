"""The layout's promises, checked in fresh interpreters: the Celery side of the worker and Flower's
app load no torch or diffusers; the GPU engine loads no celery, kombu or redis; the producer loads
neither the worker nor torch."""
from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import worker
import worker.engine

REPO = Path(__file__).resolve().parents[1]
GPU_LIBRARIES = ("torch", "diffusers", "transformers", "triton")
QUEUE_LIBRARIES = ("celery", "kombu", "redis", "billiard")


def celery_side_modules() -> list[str]:
    return sorted(f"worker.{m.name}" for m in pkgutil.iter_modules(worker.__path__) if m.name != "engine")


def engine_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(worker.engine.__path__, "worker.engine."))


def loaded_after_importing(modules: list[str]) -> set[str]:
    """Top-level packages in sys.modules after importing `modules` in a fresh interpreter."""
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_the_layout_lists_the_modules_these_checks_walk():
    assert {"worker.app", "worker.tasks", "worker.transport", "worker.startup", "worker.loading"} \
        <= set(celery_side_modules())
    assert {"worker.engine.diffusion", "worker.engine.specs", "worker.engine.placement",
            "worker.engine.kernels.silu_gate", "worker.engine.kernels.qk_norm_rope"} <= set(engine_modules())


def test_no_celery_side_module_nor_flowers_app_loads_torch_or_diffusers():
    modules = celery_side_modules() + ["worker.flower_app"]
    # One interpreter for all (what none of them loads together, none loads alone); the culprits are
    # named module by module only when that fails.
    loaded = loaded_after_importing(modules) & set(GPU_LIBRARIES)
    culprits = {m: sorted(loaded_after_importing([m]) & set(GPU_LIBRARIES)) for m in modules} if loaded else {}
    assert not loaded, {m: libs for m, libs in culprits.items() if libs}


def test_the_whole_engine_loads_neither_celery_nor_redis():
    loaded = loaded_after_importing(engine_modules())
    assert "torch" in loaded  # the walk did reach the modules that compute
    assert not loaded & set(QUEUE_LIBRARIES), sorted(loaded & set(QUEUE_LIBRARIES))


def test_the_producer_and_shared_load_neither_the_worker_nor_torch():
    shared = sorted(f"shared.{m.name}" for m in pkgutil.iter_modules([str(REPO / "shared")]))
    producer = sorted(f"producer.{m.name}" for m in pkgutil.iter_modules([str(REPO / "producer")]))
    loaded = loaded_after_importing(shared + producer)
    assert "worker" not in loaded and not loaded & set(GPU_LIBRARIES)
