"""The model's loading state in a rendering process, and the one place that picks the renderer.

Celery gives `worker_process_init` only seconds, so the pool process loads the renderer in a
background thread; jobs wait on `renderer()`. The parent learns the outcome through shared memory
made before the pool forks (`LOAD_STATE`: 0 loading, 1 ready, 2 failed, with the error text, the
load time and a JSON report of the boot self-test: the profile that passed, and the ones that failed
before it, and its quality block: `worker.calibration`), and only then consumes job queues
(`worker.registration`).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import threading
import time

from worker import config
from worker.state import STATE

log = logging.getLogger(__name__)

LOADING, READY, FAILED = 0, 1, 2
# Room for a failure naming every profile tried, and for the report of a step-down.
LOAD_ERROR_MAX_BYTES = 7999
LOAD_REPORT_MAX_BYTES = 7999
LOAD_STATE = multiprocessing.RawValue("i", LOADING)
LOAD_ERROR = multiprocessing.RawArray("c", LOAD_ERROR_MAX_BYTES + 1)
LOAD_REPORT = multiprocessing.RawArray("c", LOAD_REPORT_MAX_BYTES + 1)
LOAD_S = multiprocessing.RawValue("d", 0.0)
THREAD_NAME = "zfarm-load"

_renderer = None
_renderer_ready = threading.Event()
_renderer_error: list[str] = []


def make_renderer(settings, boot):
    """The renderer this worker runs: simulated when asked for, else diffusers on `boot`'s device.
    The engine's diffusers renderer (and torch with it) is imported only here, in the pool process."""
    if settings.simulated:
        from worker.engine.render import SimulatedRenderer

        return SimulatedRenderer(settings.simulate_s)
    from worker.engine.diffusion import DiffusionRenderer

    return DiffusionRenderer(settings, boot, table=config.table())


def start_loading(**_):
    """Celery's `worker_process_init` (pool process): load the renderer in the background."""
    global _renderer
    _renderer = None
    _renderer_ready.clear()
    _renderer_error.clear()
    threading.Thread(target=_load_renderer, name=THREAD_NAME, daemon=True).start()


def _load_renderer():
    global _renderer
    settings = config.settings().replace(model=STATE.model_path)
    t0 = time.monotonic()
    try:
        renderer = make_renderer(settings, STATE.boot)
        if settings.simulated:
            renderer.load()
        else:
            # The quality gate (worker.calibration): references ready first, then each variant judged.
            from worker.calibration import Gate

            gate = Gate(settings, STATE.boot, config.table(), STATE.name)
            gate.prepare(make_renderer)
            renderer.load(judge=gate.judge, known_failure=gate.known_failure)
    except Exception as exc:  # any load failure must stop the worker with its reason, not hang it
        log.critical("zfarm: loading the model failed: %s: %s", type(exc).__name__, exc, exc_info=True)
        _renderer_error.append(f"{type(exc).__name__}: {exc}")
        LOAD_ERROR.value = _renderer_error[0].encode()[:LOAD_ERROR_MAX_BYTES]
        LOAD_STATE.value = FAILED
        _renderer_ready.set()
        return
    _renderer = renderer
    LOAD_S.value = time.monotonic() - t0
    LOAD_REPORT.value = _report(renderer).encode()[:LOAD_REPORT_MAX_BYTES]
    LOAD_STATE.value = READY
    log.info("zfarm: renderer ready in %.1f s (%s)", LOAD_S.value, renderer.describe())
    _renderer_ready.set()


def _report(renderer) -> str:
    """What the parent needs of a finished load: the profile that passed its self-test and, when it is not
    the one chosen, the step-down (from, reason, each attempt) -- as JSON that fits the shared buffer."""
    described = renderer.describe()
    report = {"profile": described.get("profile"), "policy": described.get("policy", ""),
              "quality": described.get("quality") or {}, "self_test": described.get("self_test") or {}}
    step_down = described.get("boot_step_down") or {}
    if step_down:
        attempts = [{k: v for k, v in a.items() if k != "quality"} | {"error": a["error"][:300]}
                    for a in step_down.get("attempts", [])]
        report.update(downgraded_from=step_down["from"], downgraded_to=step_down["to"],
                      reason=step_down["reason"][:500], attempts=attempts)
    text = json.dumps(report)
    while len(text.encode()) > LOAD_REPORT_MAX_BYTES and report.get("attempts"):
        report["attempts"].pop()
        text = json.dumps(report)
    return text


def renderer(timeout_s: float | None = None):
    """The loaded renderer of this process; loads it here when no init hook ran (solo pool)."""
    if not _renderer_ready.is_set() and not any(t.name == THREAD_NAME for t in threading.enumerate()):
        _load_renderer()
    if not _renderer_ready.wait(timeout_s):
        raise TimeoutError("the model is still loading")
    if _renderer_error:
        raise RuntimeError(f"model failed to load: {_renderer_error[0]}")
    return _renderer


def load_outcome() -> tuple[int, str, float, dict]:
    """(LOADING, READY or FAILED, the error text, the load time in s, the load report), as the parent
    reads them."""
    raw = LOAD_REPORT.value.decode(errors="replace")
    return LOAD_STATE.value, LOAD_ERROR.value.decode(errors="replace"), LOAD_S.value, json.loads(raw) if raw else {}
