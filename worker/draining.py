"""Leaving without losing a job: SIGTERM draining, and handing back what was popped but not recorded.

SIGTERM (a spot instance's notice) runs Celery's soft shutdown, as SIGQUIT does: the job in progress
may finish within `shutdown_grace_s`, else it goes back to its queue. Meanwhile the registry entry is
marked `draining` and kept alive through the grace period, so that other workers' sweeps do not take
the job while it finishes.
"""
from __future__ import annotations

import logging
import signal

import redis

from shared import keys
from shared.redis_conn import connect
from worker import config
from worker.state import STATE
from worker.transport import hand_back_unrecorded, popped_unrecorded

log = logging.getLogger(__name__)
# Marking a draining worker must not hold up its shutdown while Redis is away.
DRAIN_REDIS_RETRY_S = 2.0


def install_sigterm_draining() -> None:
    """SIGTERM: mark the registry entry draining and keep it alive, then run Celery's SIGQUIT
    handler (the soft shutdown)."""
    settings = config.settings()
    quit_handler = signal.getsignal(signal.SIGQUIT)

    def handler(signum, frame):
        try:
            client = connect(settings.redis_url, retry_s=DRAIN_REDIS_RETRY_S, master_name=settings.redis_master_name)
            client.hset(keys.worker(STATE.name), "state", "draining")
            client.pexpire(keys.worker(STATE.name), int((settings.shutdown_grace_s + settings.registry_ttl_s) * 1000))
        except Exception as exc:  # the shutdown must go on even when Redis is away
            log.warning("could not mark %s draining: %s", STATE.name, exc)
        if callable(quit_handler):
            quit_handler(signum, frame)

    signal.signal(signal.SIGTERM, handler)


def hand_back_popped(client) -> None:
    """Return to their queues the items this worker popped as Redis went away and has not handed
    back yet; when Redis is still away, name them, since they exist nowhere else."""
    try:
        hand_back_unrecorded(client)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        for key, item in popped_unrecorded():
            log.critical("a job message popped from %s could not be handed back (%s); push it back by hand "
                         "with RPUSH: %s", key.decode(errors="replace"), exc, item.decode(errors="replace"))
