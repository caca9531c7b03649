"""The app Flower should load: `celery -A worker.flower_app flower`.

Flower lists queue lengths only for queues some live worker consumes, so a queue of large jobs
that no capable worker is serving (the very queue an operator needs to see) would be invisible.
This module widens Flower's queue list to every zfarm queue the profile table implies.
"""
from __future__ import annotations

from flower.views import BaseHandler

from shared import routing
from worker import config
from worker.app import app

__all__ = ["app"]

# Flower reads queue lengths with its own Redis client chosen by URL scheme, and knows no
# custom transport class; it consumes no jobs, so the stock transport is right for it.
app.conf.broker_transport = None


def all_queues() -> list[str]:
    """Every job queue a producer can fill (`routing.all_job_queues`), served or not."""
    return routing.all_job_queues(config.table(), config.settings().lanes)


_flower_queue_names = BaseHandler.get_active_queue_names


def _every_queue_name(self):
    return sorted(set(_flower_queue_names(self)) | set(all_queues()))


BaseHandler.get_active_queue_names = _every_queue_name
