"""Redis connections that ride out a restart: commands retry with backoff while it comes back."""
from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def connect(url: str, retry_s: float = 60.0) -> redis.Redis:
    """A client whose commands retry on connection errors for about `retry_s` seconds."""
    attempts = max(1, int(retry_s / 2))
    return redis.Redis.from_url(
        url, socket_connect_timeout=5, socket_keepalive=True, health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), attempts),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError])
