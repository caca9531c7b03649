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

from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import redis
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.errors import RedisUrlError
from shared.settings import DEFAULT_REDIS_MASTER_NAME

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


def connect(url: str, retry_s: float = 60.0, master_name: str = DEFAULT_REDIS_MASTER_NAME) -> redis.Redis:
    """A client whose commands retry on connection errors for about `retry_s` seconds. With a
    `sentinel://` URL it is a client of the primary named `master_name`, found through the sentinels
    on every new connection, so it follows a failover."""
    attempts = max(1, int(retry_s / 2))
    options = dict(socket_connect_timeout=5, socket_keepalive=True, health_check_interval=30,
                   retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), attempts), retry_on_error=list(RETRY_ON))
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    sentinel_kwargs = sentinel_transport_options(url, master_name)["sentinel_kwargs"]
    credentials = {"username": target.username, "password": target.password}
    manager = redis.sentinel.Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs, **credentials)
    return manager.master_for(master_name, db=target.db, **options)


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
