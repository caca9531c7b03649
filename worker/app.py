"""The zfarm Celery app. `celery -A worker.app worker` and `zfarm worker` both start it.

Importing this module must stay cheap and torch-free: Flower and `celery inspect` import it. The
configuration is built from the worker's Settings (`worker.config`) when Celery first reads it, not
at import. GPU detection, model loading and rendering happen only when a worker boots
(`worker.boot`) and renders (`worker.tasks`).
"""
from __future__ import annotations

from celery import Celery

from shared import routing
from shared.redis_conn import broker_url, is_sentinel, sentinel_transport_options
from shared.schema import STEPS_MAX
from worker import boot, config


def celery_config(settings, table: dict) -> dict:
    """Celery's settings for a zfarm worker with these zfarm `settings` and profile `table`."""
    return dict(
        broker_url=broker_url(settings.redis_url),
        # JSON only: pickle from a shared Redis would let anyone who can write to it run code here.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        # Outcomes live in the batch ledger, not in a Celery result backend.
        task_ignore_result=True,
        # One job at a time per process, acknowledged only after its result is stored; a job whose
        # process dies goes back to the queue at once.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # A default hard limit for messages that carry none; producers set one per job.
        task_time_limit=routing.job_time_limit_s(routing.JOB_MAX_PIXELS, STEPS_MAX, table, settings.job_margin),
        # kombu's Redis transport (or its Sentinel transport), hardened so junk pushed into a queue
        # cannot stop the worker.
        broker_transport="worker.transport:" + ("SentinelTransport" if is_sentinel(settings.redis_url) else "Transport"),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            # Longer than the longest job any worker may run, so a healthy job is never delivered
            # twice; jobs of dead workers are handed back sooner by the registry sweep (worker.sweeper).
            "visibility_timeout": routing.visibility_timeout_s(table, settings.job_margin),
            "queue_order_strategy": "worker.queue_order:ZfarmCycle",
            # kombu's restore of messages unacked past the visibility timeout (hours): once a minute
            # is plenty; the registry sweep hands back a dead worker's jobs within a TTL.
            "unacked_restore_interval": 60,
            "unacked_restore_throttle": 1,
            "socket_keepalive": True,
            "retry_on_timeout": True,
            # A connection idle this long is PINGed before its next command, and a BRPOP overdue by
            # this much is dropped: 10 s PINGed the events connection before every worker heartbeat
            # (every 10 s), the largest idle cost left. A half-open BRPOP is still dropped within 45 s.
            "health_check_interval": 20,
            # With a sentinel:// URL: the monitored primary's name, and the sentinels' password.
            **sentinel_transport_options(settings.redis_url, settings.redis_master_name),
        },
        # SIGTERM (a spot notice) lets the running job finish for this long, then hands it back.
        worker_soft_shutdown_timeout=settings.shutdown_grace_s,
        worker_enable_soft_shutdown_on_idle=False,
        # Task events cost three PUBLISHes per job; Flower switches them on while it runs
        # (its enable_events option, on by default), so nobody pays for them unwatched.
        worker_send_task_events=False,
        worker_consumer="worker.consumer:ZfarmConsumer",
        task_default_queue=routing.HOLDING_QUEUE,
    )


app = Celery("zfarm", include=["worker.tasks"])
# A promise: evaluated when Celery first reads its configuration, after `zfarm worker` installed its
# settings (worker.config.install).
app.add_defaults(lambda: celery_config(config.settings(), config.table()))
boot.install(app)
