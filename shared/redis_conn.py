"""Redis connections that ride out a restart or a Sentinel failover: commands retry with backoff
while the primary comes back, or while Sentinel promotes a replica.

`ZFARM_REDIS_URL` takes either a plain `redis://[:password@]host:port/db` or Celery's Sentinel form,
`sentinel://[:password@]host:port[;sentinel://[:password@]host:port...][/db]`, with
`ZFARM_REDIS_MASTER_NAME` naming the primary the sentinels monitor. A Sentinel client asks the
sentinels for the current primary on every new connection, so a client that was talking to a primary
that died reconnects to the replica Sentinel promoted.

One password, given in the URL, authenticates both to the sentinels and to the primary and replicas
(docker-compose.yml sets it the same on all of them).
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import redis
import redis.sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from shared.errors import RedisAuthError, RedisUrlError
from shared.settings import DEFAULT_REDIS_MASTER_NAME

BACKOFF_BASE_S, BACKOFF_CAP_S = 0.1, 2.0

SENTINEL_SCHEME = "sentinel"
SENTINEL_DEFAULT_PORT = 26379
# How long one sentinel may take to answer before the next is asked; they answer in milliseconds.
SENTINEL_SOCKET_TIMEOUT_S = 2.0
RETRY_ON = [redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError]


@dataclass(frozen=True)
class SentinelTarget:
    """What a `sentinel://` URL names: the sentinels, the credentials and the database."""
    sentinels: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    db: int


def is_sentinel(url: str) -> bool:
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The sentinels of a `sentinel://a:26379;sentinel://b:26379/0` URL. The database may follow any
    of them (Celery's docs put it after the last) and holds for all; credentials are the first given."""
    sentinels, username, password, db = [], None, None, None
    for part in filter(None, (p.strip() for p in url.split(";"))):
        parsed = urlparse(part)
        if parsed.scheme.lower() != SENTINEL_SCHEME or not parsed.hostname:
            raise RedisUrlError(f"not a sentinel://host:port URL: {_redact_one(part)!r}")
        try:
            port = parsed.port or SENTINEL_DEFAULT_PORT
        except ValueError as exc:
            raise RedisUrlError(f"bad port in {_redact_one(part)!r}: {exc}") from None
        sentinels.append((parsed.hostname, port))
        if password is None and parsed.password is not None:
            username, password = unquote(parsed.username or "") or None, unquote(parsed.password)
        path = parsed.path.strip("/")
        if path:
            if not path.isdigit():
                raise RedisUrlError(f"database must be a number, got {path!r}")
            if db is not None and int(path) != db:
                raise RedisUrlError(f"two databases in one Sentinel URL: {db} and {path}")
            db = int(path)
    if not sentinels:
        raise RedisUrlError("a sentinel:// URL names no sentinel")
    return SentinelTarget(tuple(sentinels), username, password, db or 0)


def broker_url(url: str) -> str:
    """The URL as Celery and kombu should get it. For Sentinel: the first sentinel alone, with the
    database. kombu reads the database of the first sentinel only, and on a connection error it
    switches to the next URL of a `;` list with the stock transport of that URL's scheme, dropping
    the worker's hardened one; the worker's channel asks every sentinel anyway
    (`sentinel_transport_options` hands it the list)."""
    if not is_sentinel(url):
        return url
    target = parse_sentinel_url(url)
    first = urlparse(url.split(";")[0].strip())
    return first._replace(path=f"/{target.db}").geturl()


def sentinel_transport_options(url: str, master_name: str) -> dict:
    """kombu's Sentinel transport options for `url`: the monitored primary's name, the password for
    the sentinels themselves (kombu sends the URL's password to the primary only), and every sentinel
    (read by `worker.transport.SentinelChannel`)."""
    if not is_sentinel(url):
        return {}
    target = parse_sentinel_url(url)
    sentinel_kwargs = {"socket_timeout": SENTINEL_SOCKET_TIMEOUT_S, "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT_S}
    if target.password is not None:
        sentinel_kwargs["password"] = target.password
        if target.username:
            sentinel_kwargs["username"] = target.username
    return {"master_name": master_name, "sentinel_kwargs": sentinel_kwargs,
            "sentinels": [list(s) for s in target.sentinels]}


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


def auth_failure(shown_url: str, has_password: bool, error: Exception) -> str:
    """What a refused login means, in words an operator can act on (not the raw AUTH or HELLO reply)."""
    if not has_password:
        return (f"authentication required: Redis at {shown_url} needs a password and ZFARM_REDIS_URL gives none "
                "(redis://:PASSWORD@host:port/db)")
    if "without any password configured" in str(error):
        return f"authentication failed: ZFARM_REDIS_URL gives a password, but Redis at {shown_url} has none set"
    return f"authentication failed: Redis at {shown_url} refused the user name and password of ZFARM_REDIS_URL"


def check_credentials(url: str, timeout_s: float = 5.0, master_name: str = DEFAULT_REDIS_MASTER_NAME) -> None:
    """Raise RedisAuthError when Redis refuses this URL's credentials. An unreachable Redis is not this
    function's concern: the caller retries on connection loss."""
    options = dict(socket_connect_timeout=timeout_s, socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
    client = _client(url, master_name, options)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise RedisAuthError(auth_failure(redact(url), urlparse(url).password is not None, exc)) from None
    except (redis.ConnectionError, redis.TimeoutError, redis.sentinel.MasterNotFoundError):
        pass
    finally:
        client.close()


def connect(url: str, retry_s: float = 60.0, on_retry=None, *,
            master_name: str = DEFAULT_REDIS_MASTER_NAME) -> redis.Redis:
    """A client whose commands retry on connection errors for `retry_s` seconds from their first failure
    (a Redis restart, a failover); an authentication error is raised at once. With a `sentinel://` URL it
    is a client of the primary named `master_name`, found through the sentinels on every new
    connection, so it follows a failover."""
    options = dict(socket_connect_timeout=5, socket_keepalive=True, health_check_interval=30,
                   retry=RetryFor(retry_s, on_retry), retry_on_error=list(RETRY_ON))
    return _client(url, master_name, options)


def _client(url: str, master_name: str, options: dict) -> redis.Redis:
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    sentinel_kwargs = sentinel_transport_options(url, master_name)["sentinel_kwargs"]
    credentials = {"username": target.username, "password": target.password}
    manager = redis.sentinel.Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs, **credentials)
    return manager.master_for(master_name, connection_class=FollowingConnection, db=target.db, **options)


class FollowingConnection(redis.sentinel.SentinelManagedConnection):
    """A connection to the primary the sentinels name that asks them again on every reconnect.

    redis-py's stock class asks only in `connect()`. A command cut off mid-flight is retried on the same
    connection object, which reconnects through `connect_check_health` to the address it resolved
    before: after a failover, the dead primary's, for the whole retry period (60 s by default) instead
    of the seconds Sentinel takes to promote the replica. The redis-py internals this relies on are
    checked in tests/test_redis_internals.py."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._address_just_resolved = False

    def connect_to(self, address):
        # `connect()` has just asked the sentinels: no second question for this connect.
        self._address_just_resolved = True
        try:
            super().connect_to(address)
        finally:
            self._address_just_resolved = False

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True):
        if not self._sock and not self._address_just_resolved and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


def redact(url: str) -> str:
    """A Redis or Sentinel URL without its passwords, for messages and logs."""
    return ";".join(_redact_one(part) for part in url.split(";"))


def _redact_one(url: str) -> str:
    parsed = urlparse(url)
    try:
        if parsed.password is None:
            return url
        port = parsed.port
    except ValueError:
        return "<unreadable URL>"
    netloc = f"{parsed.username or ''}:***@{parsed.hostname or ''}" + (f":{port}" if port else "")
    return parsed._replace(netloc=netloc).geturl()
