"""A worker's boot and life in the registry.

Parent process (before the pool forks): detect the card through NVML, choose the profile, resolve
the model folder (downloading it if needed), name the node after its class (`zimage-12g@host`).
It starts consuming nothing but a holding queue; the job queues are added only once a rendering
process reports the model loaded, so a loading worker never holds a job it cannot start.

Pool process: load the renderer in a background thread (Celery gives `worker_process_init` only
seconds), then mark the registry entry `ready`.

The parent heartbeats the registry entry, sweeps jobs held by dead workers back to their queues,
and deregisters on clean shutdown.
"""
from __future__ import annotations

import functools
import importlib.metadata
import logging
import multiprocessing
import os
import platform
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis
from celery import bootsteps, signals
from celery.worker import state as worker_state

from shared import keys, profiles, registry
from shared.schema import PRIORITIES
from shared.redis_conn import connect
from worker import detect, model_source

log = logging.getLogger(__name__)

EX_CONFIG = 78  # sysexits EX_CONFIG: the worker cannot start as configured
# How often the parent looks whether the rendering process has loaded the model.
READY_POLL_S = 0.05


@dataclass
class WorkerState:
    """What this worker process knows about itself; set in the parent, inherited by the pool."""
    boot: detect.BootInfo | None = None
    name: str = ""
    instance: str = ""
    model_path: str = ""
    queues: list = field(default_factory=list)
    started_at: float = 0.0
    ready: bool = False

    @property
    def claim(self) -> str:
        """How the ledger names this worker instance in a job's running entry."""
        return f"{self.name}/{self.instance}"


STATE = WorkerState()
# Shared memory made before the pool forks: the rendering process reports its load here
# (0 loading, 1 ready, 2 failed), the parent reads it to start consuming or to stop.
_LOAD_STATE = multiprocessing.RawValue("i", 0)
_LOAD_ERROR = multiprocessing.RawArray("c", 1000)
_LOAD_S = multiprocessing.RawValue("d", 0.0)
_renderer = None
_renderer_ready = threading.Event()
_renderer_error: list[str] = []


def versions() -> dict:
    """Versions of what renders, for the registration and every job's sidecar (a fresh copy)."""
    return dict(_versions())


@functools.cache
def _versions() -> dict:
    # Cached: reading package metadata costs ~4 ms, once per job before it was cached.
    out = {"python": platform.python_version()}
    for dist in ("zfarm", "celery", "kombu", "redis", "torch", "diffusers", "transformers", "accelerate"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def worker_queues(boot: detect.BootInfo, table: dict, lanes: int) -> list[str]:
    """Every queue this worker consumes: each priority, each size tier it can render every job of
    (`profiles.tiers_served`: the shared tier always), each lane. `worker.queue_order` orders them."""
    tiers = profiles.tiers_served(boot.choice.max_pixels, profiles.max_pixels_by_class(table))
    return [keys.queue(p, t, lane) for p in PRIORITIES for t in tiers for lane in range(max(1, lanes))]


def all_job_queues(table: dict, lanes: int) -> list[str]:
    """Every job queue a producer can fill: each priority, each size tier of the table, each lane."""
    tiers = profiles.tier_ceilings(profiles.max_pixels_by_class(table))
    return [keys.queue(p, t, lane) for p in PRIORITIES for t in tiers for lane in range(max(1, lanes))]


def registration(settings) -> dict:
    boot = STATE.boot
    return {
        "name": STATE.name, "instance": STATE.instance, "host": boot.host, "pid": os.getpid(),
        "gpu": boot.gpu, "vram_gb": boot.vram_gib, "vram_class": boot.vram_class,
        "cap_gib": boot.cap_gib if boot.cap_gib is not None else "", "profile": boot.choice.profile,
        "max_pixels": boot.choice.max_pixels,
        "s_per_image_measured": boot.choice.s_per_image if boot.choice.s_per_image is not None else "",
        "host_ram_gb": boot.host_ram_gib, "model": settings.model,
        "renderer": "simulated" if settings.simulated else "diffusers",
        "simulate_s": settings.simulate_s if settings.simulated else "",
        "versions": versions(), "started_at": STATE.started_at,
        "state": "ready" if STATE.ready else "loading",
        "tiers": sorted({keys.parse_queue(q)[1] for q in STATE.queues}),
        # Producers never queue into a lane beyond the fewest any live worker consumes.
        "lanes": settings.lanes,
    }


def free_default_name(settings, boot) -> str:
    """`zimage-<class>@<host>`, or `zimage-<class>-2@<host>`... when a live worker holds it: two
    workers under one name would overwrite each other's registration and hand back each other's jobs."""
    label = profiles.class_label(boot.vram_class)
    client = connect(settings.redis_url, master_name=settings.redis_master_name)
    for n in range(1, 100):
        name = f"zimage-{label}{'' if n == 1 else f'-{n}'}@{boot.host}"
        if not registry.is_alive(client, name):
            return name
    raise SystemExit(f"zfarm worker cannot start: 99 live workers already named zimage-{label}-N@{boot.host}")


def on_celeryd_init(sender=None, instance=None, conf=None, options=None, **_):
    from worker.app import settings, table

    try:
        boot = detect.detect(settings, table)
    except (profiles.ProfileError, ValueError) as exc:
        raise SystemExit(f"zfarm worker cannot start: {exc}")
    model_path = settings.model
    if not settings.simulated:
        try:
            model_path = model_source.resolve_model(settings.model, settings.model_cache_dir)
        except model_source.ModelNotFound as exc:
            print(f"zfarm worker cannot start: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(EX_CONFIG)
    STATE.boot = boot
    STATE.model_path = model_path
    STATE.instance = uuid.uuid4().hex[:10]
    STATE.started_at = time.time()
    STATE.queues = worker_queues(boot, table, settings.lanes)
    default_name = instance.hostname.startswith("celery@")
    if settings.worker_name:
        instance.hostname = settings.worker_name if "@" in settings.worker_name \
            else f"{settings.worker_name}@{boot.host}"
    elif default_name:
        instance.hostname = free_default_name(settings, boot)
    STATE.name = instance.hostname
    from worker import metrics

    metrics.start(settings.metrics_port)
    from worker.health import name_file

    try:
        name_file().write_text(STATE.name)
    except OSError as exc:
        log.info("cannot write %s (%s); health checks need ZFARM_WORKER_NAME", name_file(), exc)
    log.info("zfarm worker %s: %s, class %s, profile %s, max_pixels %d, %d queues",
             STATE.name, boot.gpu, boot.vram_class, boot.choice.profile, boot.choice.max_pixels, len(STATE.queues))


def on_worker_process_init(**_):
    """Pool process: load the renderer in the background; jobs wait on `renderer()`."""
    global _renderer
    _renderer = None
    _renderer_ready.clear()
    _renderer_error.clear()
    threading.Thread(target=_load_renderer, name="zfarm-load", daemon=True).start()


def _load_renderer():
    global _renderer
    from worker.app import settings
    from worker.render import make_renderer

    t0 = time.monotonic()
    try:
        renderer = make_renderer(settings.replace(model=STATE.model_path), STATE.boot)
        renderer.load()
    except Exception as exc:  # any load failure must stop the worker with its reason, not hang it
        log.critical("zfarm: loading the model failed: %s: %s", type(exc).__name__, exc, exc_info=True)
        _renderer_error.append(f"{type(exc).__name__}: {exc}")
        _LOAD_ERROR.value = _renderer_error[0].encode()[:999]
        _LOAD_STATE.value = 2
        _renderer_ready.set()
        return
    _renderer = renderer
    _LOAD_S.value = time.monotonic() - t0
    _LOAD_STATE.value = 1
    log.info("zfarm: renderer ready in %.1f s (%s)", _LOAD_S.value, renderer.describe())
    _renderer_ready.set()


def renderer(timeout_s: float | None = None):
    """The loaded renderer of this process; loads it here when no init hook ran (solo pool)."""
    if not _renderer_ready.is_set() and not any(t.name == "zfarm-load" for t in threading.enumerate()):
        _load_renderer()
    if not _renderer_ready.wait(timeout_s):
        raise TimeoutError("the model is still loading")
    if _renderer_error:
        raise RuntimeError(f"model failed to load: {_renderer_error[0]}")
    return _renderer


class RegistryStep(bootsteps.StartStopStep):
    """Consumer step: registration, heartbeat, readiness gate and the dead-worker sweep."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        self.timers = []
        self.client = None

    def start(self, c):
        from worker.app import settings

        self.client = connect(settings.redis_url, master_name=settings.redis_master_name)
        registry.register(self.client, registration(settings), settings.registry_ttl_s)
        if STATE.ready:
            self._consume(c)
        self.timers = [
            c.timer.call_repeatedly(settings.heartbeat_s, self._heartbeat, (settings,), priority=10),
            c.timer.call_repeatedly(settings.heartbeat_s, self._sweep, (settings,), priority=5),
            c.timer.call_repeatedly(settings.heartbeat_s, self._webhooks, (settings,), priority=1),
        ]
        if not STATE.ready:
            # Reads a shared-memory flag: cheap, and the first job waits on it.
            self.timers.append(c.timer.call_repeatedly(READY_POLL_S, self._await_ready, (c,), priority=10))

    def _await_ready(self, c):
        if STATE.ready:
            return
        if _LOAD_STATE.value == 1:
            STATE.ready = True
            self.client.hset(keys.worker(STATE.name), mapping={"state": "ready", "load_s": f"{_LOAD_S.value:.2f}"})
            self._consume(c)
        elif _LOAD_STATE.value == 2:
            error = _LOAD_ERROR.value.decode(errors="replace")
            self.client.hset(keys.worker(STATE.name), mapping={"state": "failed", "error": error})
            log.critical("zfarm worker %s stops: the model did not load (%s)", STATE.name, error)
            worker_state.should_stop = EX_CONFIG

    def _consume(self, c):
        for queue in STATE.queues:
            c.add_task_queue(queue)
        # The BRPOP in flight waits on the holding queue alone until its timeout; end it so the job
        # queues are polled now.
        woken = c.task_consumer.channel.wake()  # worker.transport's Channel (app.broker_transport)
        log.info("zfarm worker %s consumes %d queues%s", STATE.name, len(STATE.queues),
                 " (woke the BRPOP in flight)" if woken else "")

    def _heartbeat(self, settings):
        from worker.sweeper import held_jobs

        # The jobs held now: the sweep hands back a job a live worker claims but no longer holds.
        if not registry.heartbeat(self.client, STATE.name, settings.registry_ttl_s, jobs=held_jobs()):
            log.warning("registry entry of %s had expired; registering again", STATE.name)
            registry.register(self.client, registration(settings), settings.registry_ttl_s)

    def _sweep(self, settings):
        from worker.app import table
        from worker.sweeper import requeue_lost_jobs, sweep_dead_claims

        # A live worker claims a job within moments of taking its message; one registry TTL is
        # far longer than that, and no longer than noticing a dead worker takes anyway.
        restored = sweep_dead_claims(self.client, settings.heartbeat_s * 2, min_age_s=settings.registry_ttl_s)
        if restored:
            log.warning("handed %d job(s) of dead workers back to their queues", restored)

        def time_limit_for(job):
            return profiles.job_time_limit_s(job.spec.pixels, job.spec.steps, table, settings.job_margin)

        # A message is recorded within milliseconds of its pop; two registry TTLs without one
        # means the pop's worker, or Redis, died in between.
        requeue_lost_jobs(self.client, all_job_queues(table, settings.lanes), time_limit_for,
                          confirm_s=settings.registry_ttl_s * 2, lock_s=settings.heartbeat_s * 2)

    def _webhooks(self, settings):
        from worker.webhooks import deliver_finished

        deliver_finished(self.client, settings.webhook_timeout_s)

    def stop(self, c):
        for timer in self.timers:
            timer.cancel()
        self.timers = []

    def shutdown(self, c):
        self.stop(c)
        if self.client is not None:
            _hand_back_popped(self.client)
            registry.deregister(self.client, STATE.name)
            log.info("zfarm worker %s deregistered", STATE.name)


def _hand_back_popped(client) -> None:
    """Return to their queues the items this worker popped as Redis went away and has not handed
    back yet; when Redis is still away, name them, since they exist nowhere else."""
    from worker.transport import hand_back_unrecorded, popped_unrecorded

    try:
        hand_back_unrecorded(client)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        for key, item in popped_unrecorded():
            log.critical("a job message popped from %s could not be handed back (%s); push it back by hand "
                         "with RPUSH: %s", key.decode(errors="replace"), exc, item.decode(errors="replace"))


class InfoStep(bootsteps.StartStopStep):
    """Worker step whose info() shows the card, class and profile in `inspect stats` and Flower."""

    def info(self, worker):
        boot = STATE.boot
        if boot is None:
            return {}
        info = {"gpu": boot.gpu, "vram_gb": boot.vram_gib, "vram_class": boot.vram_class,
                "profile": boot.choice.profile, "max_pixels": boot.choice.max_pixels,
                "s_per_image_measured": boot.choice.s_per_image, "model": STATE.model_path,
                "ready": STATE.ready, "queues": len(STATE.queues)}
        try:
            from worker.app import settings

            live = {w["name"]: w for w in registry.live_workers(connect(
                settings.redis_url, retry_s=2, master_name=settings.redis_master_name))}
            me = live.get(STATE.name, {})
            info.update({"s_per_image": me.get("s_per_image"), "jobs_done": me.get("jobs_done"),
                         "jobs_failed": me.get("jobs_failed"), "profile": me.get("profile", boot.choice.profile)})
        except Exception as exc:  # stats must answer even while Redis is away; say why speed is missing
            info["s_per_image"] = f"unavailable: {type(exc).__name__}"
        return {"zfarm": info}


def _on_sigterm_draining(worker):
    """SIGTERM: keep our registry entry alive through the grace period (so the sweep of other
    workers does not take our job while it finishes), then let Celery's soft shutdown run."""
    from worker.app import settings

    quit_handler = signal.getsignal(signal.SIGQUIT)

    def handler(signum, frame):
        try:
            client = connect(settings.redis_url, retry_s=2, master_name=settings.redis_master_name)
            client.hset(keys.worker(STATE.name), "state", "draining")
            client.pexpire(keys.worker(STATE.name), int((settings.shutdown_grace_s + settings.registry_ttl_s) * 1000))
        except Exception as exc:  # the shutdown must go on even when Redis is away
            log.warning("could not mark %s draining: %s", STATE.name, exc)
        if callable(quit_handler):
            quit_handler(signum, frame)

    signal.signal(signal.SIGTERM, handler)


def on_worker_ready(sender=None, **_):
    # Celery's SIGQUIT handler runs the soft shutdown (finish within the grace period, else hand
    # the job back); SIGTERM, a spot instance's notice, should do the same.
    _on_sigterm_draining(sender)
    # The solo and threads pools render in this process and send no worker_process_init.
    if "prefork" not in type(getattr(sender, "pool", None)).__module__ and _LOAD_STATE.value == 0:
        on_worker_process_init()


def install(app) -> None:
    signals.celeryd_init.connect(on_celeryd_init, weak=False)
    signals.worker_process_init.connect(on_worker_process_init, weak=False)
    signals.worker_ready.connect(on_worker_ready, weak=False)
    app.steps["consumer"].add(RegistryStep)
    app.steps["worker"].add(InfoStep)
