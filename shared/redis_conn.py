"""Redis connections that ride out a restart: commands retry with backoff while it comes back."""
from __future__ import annotations

import socket
import threading
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

BACKOFF_BASE_S, BACKOFF_CAP_S = 0.1, 2.0


class RetryFor(Retry):
    """redis-py's Retry bounded by time instead of a count: a command is tried again, with backoff up
    to 2 s apart, until `retry_s` have passed since its first failure. Refused credentials are never
    retried: a wrong password stays wrong. `on_retry(error, retry_s)` is told of a command's first
    failure, so a caller can say why it waits.

    redis-py runs the socket connect inside the command's retry with the same object; a nested call
    makes one attempt and leaves the retrying to the command, so that a blackholed host is retried for
    `retry_s` in all, not once per level."""

    def __init__(self, retry_s: float, on_retry=None):
        super().__init__(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), -1,
                         supported_errors=(redis.ConnectionError, redis.TimeoutError, socket.timeout))
        self.retry_s = max(0.0, float(retry_s))
        self.on_retry = on_retry
        self._depth = threading.local()

    def __eq__(self, other):
        return self is other

    __hash__ = object.__hash__

    def __deepcopy__(self, memo):
        # redis-py gives each connection a deep copy; the copy gets a nesting count of its own.
        twin = RetryFor(self.retry_s, self.on_retry)
        twin._supported_errors = self._supported_errors
        return twin

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        depth = getattr(self._depth, "n", 0)
        self._depth.n = depth + 1
        try:
            return self._call(do, fail, is_retryable, with_failure_count, nested=depth > 0)
        finally:
            self._depth.n = depth

    def _call(self, do, fail, is_retryable, with_failure_count, nested: bool):
        failures, deadline = 0, None
        while True:
            try:
                return do()
            except self._supported_errors as error:
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                if nested or isinstance(error, redis.AuthenticationError) \
                        or (is_retryable is not None and not is_retryable(error)):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.retry_s
                    if self.on_retry is not None and self.retry_s > 0:
                        self.on_retry(error, self.retry_s)
                delay_s = min(self._backoff.compute(failures), deadline - now)
                if delay_s <= 0:
                    raise
                time.sleep(delay_s)


def connect(url: str, retry_s: float = 60.0, on_retry=None) -> redis.Redis:
    """A client whose commands retry on connection errors for `retry_s` seconds from their first failure
    (a Redis restart); an authentication error is raised at once."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=5, socket_keepalive=True, health_check_interval=30,
        retry=RetryFor(retry_s, on_retry),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError])
