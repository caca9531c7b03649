"""Prometheus metrics of one worker, served over HTTP by the Celery parent.

Jobs render in a prefork pool child, but the HTTP endpoint lives in the parent (children come and
go). So metrics use prometheus_client's multiprocess mode: every process writes its values to
mmapped files in `PROMETHEUS_MULTIPROC_DIR`, and the parent's endpoint sums them with a
`MultiProcessCollector`. Unless the operator set that variable, this module makes a fresh directory
per worker (counters start at zero on every start; it is removed at exit). Import this module in
the parent, before the pool forks: children inherit the directory and the metric objects.

No torch here: the parent never imports it.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile

from shared.profiles import class_label

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _prepare_multiproc_dir() -> None:
    if os.environ.get(MULTIPROC_ENV):
        return  # set by the operator or inherited from our parent: theirs to keep fresh
    path = tempfile.mkdtemp(prefix="zfarm-metrics-")
    os.environ[MULTIPROC_ENV] = path
    owner_pid = os.getpid()

    def remove_dir() -> None:
        # Forked children inherit atexit handlers: only the process that made the directory removes it.
        if os.getpid() == owner_pid:
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove_dir)


_prepare_multiproc_dir()

from prometheus_client import values  # noqa: E402

# prometheus_client picks its value class from the environment when first imported, and the `celery`
# command has usually imported it already (Flower's CLI plugin does): pick again now that the
# directory is set. Metrics made before this line stay process-local; ours are all made below.
# Never twice: two multiprocess value classes in one process would both write the same files.
if not values.ValueClass._multiprocess:
    values.ValueClass = values.get_value_class()

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server  # noqa: E402
from prometheus_client import multiprocess  # noqa: E402

# One 1024x1024 8-step image takes ~1.5 s on an H100 and minutes on a CPU or an 8 GB card with
# offload: buckets span both.
RENDER_BUCKETS_S = (0.5, 1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)

IMAGES_RENDERED = Counter(
    "zfarm_images_rendered", "Images rendered and uploaded.", ["vram_class", "profile"])
RENDER_SECONDS = Histogram(
    "zfarm_render_seconds", "Seconds one image took to render (model already loaded).",
    ["vram_class", "profile"], buckets=RENDER_BUCKETS_S)
JOBS_FAILED = Counter(
    "zfarm_jobs_failed", "Jobs that failed, by the kind of their stored reason.",
    ["vram_class", "profile", "reason"])
OOM_STEPDOWNS = Counter(
    "zfarm_oom_stepdowns", "Renders that ran out of device memory and moved to a smaller profile.",
    ["vram_class", "from_profile", "to_profile"])
UPLOAD_RETRIES = Counter(
    "zfarm_upload_retries", "Upload attempts that failed and were retried.")
# "mostrecent": the value set last by any process, i.e. the latest render's peak.
PEAK_VRAM_GIB = Gauge(
    "zfarm_peak_vram_gib", "Peak reserved device memory of the latest render, GiB.",
    ["vram_class"], multiprocess_mode="mostrecent")


def _label(vram_class) -> str:
    """8/12/.../80 or "cpu" as the registry writes them ("24g"); strings pass through."""
    return vram_class if isinstance(vram_class, str) else class_label(vram_class)


def start(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` from this (the parent) process; port 0 turns metrics off."""
    if not port:
        return
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, addr=addr, registry=registry)
    log.info("metrics on http://%s:%d/metrics", addr, port)


def observe_render(vram_class, profile: str, render_s: float) -> None:
    labels = (_label(vram_class), profile)
    IMAGES_RENDERED.labels(*labels).inc()
    RENDER_SECONDS.labels(*labels).observe(render_s)


def count_failed(vram_class, profile: str, reason_kind: str) -> None:
    JOBS_FAILED.labels(_label(vram_class), profile, reason_kind).inc()


def count_oom_stepdown(vram_class, from_profile: str, to_profile: str) -> None:
    OOM_STEPDOWNS.labels(_label(vram_class), from_profile, to_profile).inc()


def count_upload_retry() -> None:
    UPLOAD_RETRIES.inc()


def set_peak_vram(vram_class, gib: float) -> None:
    PEAK_VRAM_GIB.labels(_label(vram_class)).set(gib)
