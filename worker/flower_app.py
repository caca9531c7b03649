"""The app Flower should load: `celery -A worker.flower_app flower`.

Flower lists queue lengths only for queues some live worker consumes, so a queue of large jobs
that no capable worker is serving (the very queue an operator needs to see) would be invisible.
This module widens Flower's queue list to every zfarm queue the profile table implies.
"""
from __future__ import annotations

from flower.utils.broker import RedisSentinel
from flower.views import BaseHandler

from shared import routing
from shared.redis_conn import broker_url, is_sentinel, parse_sentinel_url
from worker import config
from worker.app import app

__all__ = ["app"]

# Flower reads queue lengths with its own Redis client chosen by URL scheme, and knows no
# custom transport class; it consumes no jobs, so the stock transport is right for it. Through
# Sentinel it keeps the worker's transport, whose channel asks every sentinel (kombu's asks one), and
# reads queue lengths with `EverySentinel` below.
if not is_sentinel(config.settings().redis_url):
    app.conf.broker_transport = None


def all_queues() -> list[str]:
    """Every job queue a producer can fill (`routing.all_job_queues`), served or not."""
    return routing.all_job_queues(config.table(), config.settings().lanes)


_flower_queue_names = BaseHandler.get_active_queue_names


def _every_queue_name(self):
    return sorted(set(_flower_queue_names(self)) | set(all_queues()))


BaseHandler.get_active_queue_names = _every_queue_name


class EverySentinel(RedisSentinel):
    """Flower's Sentinel broker client, asking every sentinel of ZFARM_REDIS_URL for the primary:
    Flower's own asks only the first one, so its queue page failed while that sentinel was down."""

    def _get_redis_client(self, broker_options, broker_use_ssl):
        client = super()._get_redis_client(broker_options, broker_use_ssl)
        manager = client.connection_pool.sentinel_manager
        first = manager.sentinels[0]
        manager.sentinels = [first.__class__(host=host, port=port, **manager.sentinel_kwargs)
                             for host, port in parse_sentinel_url(config.settings().redis_url).sentinels]
        client.connection_pool.connection_kwargs["db"] = self.vhost  # Flower's own leaves db 0
        return client


_flower_get_broker = BaseHandler.get_broker


def _get_broker(self):
    if not is_sentinel(config.settings().redis_url):
        return _flower_get_broker(self)
    return EverySentinel(broker_url(config.settings().redis_url),
                         broker_options=self.capp.conf.broker_transport_options,
                         broker_use_ssl=self.capp.conf.broker_use_ssl)


BaseHandler.get_broker = _get_broker
