"""Redis connections that ride out a restart: commands retry with backoff while it comes back."""
from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlparse

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from shared.errors import RedisAuthError

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


def redact(url: str) -> str:
    """A Redis URL without its password, for messages."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = f"{parsed.username or ''}:***@{parsed.hostname or ''}" + (f":{parsed.port}" if parsed.port else "")
    return parsed._replace(netloc=netloc).geturl()


def auth_failure(shown_url: str, has_password: bool, error: Exception) -> str:
    """What a refused login means, in words an operator can act on (not the raw AUTH or HELLO reply)."""
    if not has_password:
        return (f"authentication required: Redis at {shown_url} needs a password and ZFARM_REDIS_URL gives none "
                "(redis://:PASSWORD@host:port/db)")
    if "without any password configured" in str(error):
        return f"authentication failed: ZFARM_REDIS_URL gives a password, but Redis at {shown_url} has none set"
    return f"authentication failed: Redis at {shown_url} refused the user name and password of ZFARM_REDIS_URL"


def check_credentials(url: str, timeout_s: float = 5.0) -> None:
    """Raise RedisAuthError when Redis refuses this URL's credentials. An unreachable Redis is not this
    function's concern: the caller retries on connection loss."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                                  retry=Retry(NoBackoff(), 0))
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise RedisAuthError(auth_failure(redact(url), urlparse(url).password is not None, exc)) from None
    except (redis.ConnectionError, redis.TimeoutError):
        pass
    finally:
        client.close()


def connect(url: str, retry_s: float = 60.0, on_retry=None) -> redis.Redis:
    """A client whose commands retry on connection errors for `retry_s` seconds from their first failure
    (a Redis restart); an authentication error is raised at once."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=5, socket_keepalive=True, health_check_interval=30,
        retry=RetryFor(retry_s, on_retry),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError])
