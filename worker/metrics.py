"""Prometheus metrics of one worker, served over HTTP by the Celery parent.

Jobs render in a prefork pool child, but the endpoint lives in the parent (children come and go).
So `start(port)`, called in the parent before the pool forks, switches prometheus_client to its
multiprocess mode: every process then writes its values to mmapped files in
`PROMETHEUS_MULTIPROC_DIR`, and the parent's endpoint sums them with a `MultiProcessCollector`.
Unless the operator set that variable, `start` makes a fresh directory per worker (counters start
at zero on every start) and removes it at exit. Children inherit the directory and the metric
objects through fork.

Importing this module changes nothing (Flower imports it through worker.tasks); with port 0 the
recording functions still work, in-process and unserved. No torch here.
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import tempfile
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server, values

from shared.profiles import class_label

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# One 1024x1024 8-step image takes about a second on a large card and minutes on a CPU or a small card
# with offload: buckets span both.
RENDER_BUCKETS_S = (0.5, 1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)


@functools.cache
def _families() -> SimpleNamespace:
    """The metric objects, made once per process tree: in `start` (parent) or at first use."""
    return SimpleNamespace(
        images_rendered=Counter(
            "zfarm_images_rendered", "Images rendered and uploaded.", ["vram_class", "profile"]),
        render_seconds=Histogram(
            "zfarm_render_seconds", "Seconds one image took to render (model already loaded).",
            ["vram_class", "profile"], buckets=RENDER_BUCKETS_S),
        jobs_failed=Counter(
            "zfarm_jobs_failed", "Jobs that failed, by the kind of their stored reason.",
            ["vram_class", "profile", "reason"]),
        oom_stepdowns=Counter(
            "zfarm_oom_stepdowns", "Renders that ran out of device memory and moved to a smaller profile.",
            ["vram_class", "from_profile", "to_profile"]),
        profile_stepdowns=Counter(
            "zfarm_profile_stepdowns", "Profiles that failed their boot self-test, and the one the worker took instead.",
            ["vram_class", "from_profile", "to_profile", "reason"]),
        upload_retries=Counter(
            "zfarm_upload_retries", "Upload attempts that failed and were retried."),
        # "mostrecent": the value set last by any process, i.e. the latest render's peak.
        peak_vram_gib=Gauge(
            "zfarm_peak_vram_gib", "Peak reserved device memory of the latest render, GiB.",
            ["vram_class"], multiprocess_mode="mostrecent"),
    )


def _enable_multiprocess() -> None:
    if not os.environ.get(MULTIPROC_ENV):
        path = tempfile.mkdtemp(prefix="zfarm-metrics-")
        os.environ[MULTIPROC_ENV] = path
        owner_pid = os.getpid()

        def remove_dir() -> None:
            # Forked children inherit atexit handlers: only the process that made it removes it.
            if os.getpid() == owner_pid:
                shutil.rmtree(path, ignore_errors=True)

        atexit.register(remove_dir)
    # prometheus_client picks its value class from the environment when first imported, long
    # before this (the `celery` command imports it through Flower's plugin): pick again now. Never
    # twice: two multiprocess value classes in one process would both write the same files.
    if not values.ValueClass._multiprocess:
        values.ValueClass = values.get_value_class()


def start(port: int, addr: str = "0.0.0.0") -> bool:
    """Serve /metrics on `port` from this (the parent) process; port 0 turns serving off.

    A port already in use is logged, not raised: rendering matters more than its metrics.
    """
    if not port:
        return False
    if _families.cache_info().currsize:
        log.warning("metrics were recorded before metrics.start: pool children's values will not be served")
    _enable_multiprocess()
    _families()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    try:
        start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        log.error("metrics not served: cannot listen on %s:%d (%s); give each worker its own "
                  "ZFARM_METRICS_PORT", addr, port, exc)
        return False
    log.info("metrics on http://%s:%d/metrics", addr, port)
    return True


def _label(vram_class) -> str:
    """8/12/.../80 or "cpu" as the registry writes them ("24g"); strings pass through."""
    return vram_class if isinstance(vram_class, str) else class_label(vram_class)


def observe_render(vram_class, profile: str, render_s: float) -> None:
    labels = (_label(vram_class), profile)
    _families().images_rendered.labels(*labels).inc()
    _families().render_seconds.labels(*labels).observe(render_s)


def count_failed(vram_class, profile: str, reason_kind: str) -> None:
    _families().jobs_failed.labels(_label(vram_class), profile, reason_kind).inc()


def count_oom_stepdown(vram_class, from_profile: str, to_profile: str) -> None:
    _families().oom_stepdowns.labels(_label(vram_class), from_profile, to_profile).inc()


def count_profile_stepdown(vram_class, from_profile: str, to_profile: str, reason_kind: str) -> None:
    _families().profile_stepdowns.labels(_label(vram_class), from_profile, to_profile, reason_kind).inc()


def count_upload_retry() -> None:
    _families().upload_retries.inc()


def set_peak_vram(vram_class, gib: float) -> None:
    _families().peak_vram_gib.labels(_label(vram_class)).set(gib)
