"""The worker parent's boot, before the pool forks: read the card, choose the profile, find the
model, name the node.

Detection runs through NVML and creates no CUDA context (a context in the parent breaks forked
children). A card no profile fits, or a model no source has, stops the worker here with its reason
(exit 78: configuration), before it registers.
"""
from __future__ import annotations

import logging
import sys
import time
import uuid

from shared import profiles, redis_conn, registry, routing
from shared.errors import ModelNotFound, ProfileError
from shared.redis_conn import connect
from worker import config, metrics
from worker.engine import detect, model_source
from worker.health import name_file
from worker.state import STATE

log = logging.getLogger(__name__)

EX_CONFIG = 78  # sysexits EX_CONFIG: the worker cannot start as configured
MAX_SAME_NAME = 99


def free_default_name(settings, boot) -> str:
    """`zimage-<class>@<host>`, or `zimage-<class>-2@<host>`... when a live worker holds it: two
    workers under one name would overwrite each other's registration and hand back each other's jobs."""
    label = profiles.class_label(boot.vram_class)
    client = connect(settings.redis_url, master_name=settings.redis_master_name)
    for n in range(1, MAX_SAME_NAME + 1):
        name = f"zimage-{label}{'' if n == 1 else f'-{n}'}@{boot.host}"
        if not registry.is_alive(client, name):
            return name
    raise SystemExit(f"zfarm worker cannot start: {MAX_SAME_NAME} live workers already named "
                     f"zimage-{label}-N@{boot.host}")


def _stop_on_refused_credentials(url: str, master_name: str) -> None:
    """A wrong Redis password is a configuration error: stop at once (exit 78) with a message, instead of
    Celery's broker reconnect loop retrying it forever. An unreachable Redis is still waited for."""
    try:
        redis_conn.check_credentials(url, master_name=master_name)
    except redis_conn.RedisAuthError as exc:
        print(f"zfarm worker cannot start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EX_CONFIG)


def on_celeryd_init(sender=None, instance=None, conf=None, options=None, **_):
    """Celery's `celeryd_init` signal, in the parent: fills `worker.state.STATE`."""
    settings, table = config.settings(), config.table()
    _stop_on_refused_credentials(settings.redis_url, settings.redis_master_name)
    try:
        boot = detect.detect(settings, table)
    except (ProfileError, ValueError) as exc:
        raise SystemExit(f"zfarm worker cannot start: {exc}")
    model_path = settings.model
    if not settings.simulated:
        try:
            model_path = model_source.resolve_model(settings.model, settings.model_cache_dir)
        except ModelNotFound as exc:
            print(f"zfarm worker cannot start: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(EX_CONFIG)
    STATE.boot = boot
    STATE.model_path = model_path
    STATE.instance = uuid.uuid4().hex[:10]
    STATE.started_at = time.time()
    STATE.queues = routing.worker_queues(boot.choice.max_pixels, table, settings.lanes)
    default_name = instance.hostname.startswith("celery@")
    if settings.worker_name:
        instance.hostname = settings.worker_name if "@" in settings.worker_name \
            else f"{settings.worker_name}@{boot.host}"
    elif default_name:
        instance.hostname = free_default_name(settings, boot)
    STATE.name = instance.hostname
    metrics.start(settings.metrics_port)
    try:
        name_file().write_text(STATE.name)
    except OSError as exc:
        log.info("cannot write %s (%s); health checks need ZFARM_WORKER_NAME", name_file(), exc)
    log.info("zfarm worker %s: %s, class %s, profile %s, max_pixels %d, %d queues",
             STATE.name, boot.gpu, boot.vram_class, boot.choice.profile, boot.choice.max_pixels, len(STATE.queues))
