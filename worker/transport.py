"""kombu's Redis transport, hardened against junk in the queues.

Stock kombu parses each BRPOPed item as a JSON envelope inside its event loop, and Celery then
trusts the envelope's shape: an item that is not JSON, a `task` header that is a list, a
`delivery_tag` that is an object, a body that is not `[args, kwargs, embed]` raises there and takes
the whole worker down ("Unrecoverable error"), and kombu puts the message back for the next worker
to die on. Other shapes are dropped without a trace in the pool, or run what a queue writer chose
(callbacks, chains, other tasks). Anyone who can write to Redis could stop the farm that way.

So every item is checked here against the one message zfarm sends (`shared.wire`): JSON only,
the `zfarm.render` task, known headers of the right types (a time limit is capped below the
visibility timeout), a body of exactly `[[], {"job": ...}, {}]`. An item that fails is never delivered: when
it is the own message of a job of a batch on record (its body names the job and its task id is one the
farm gives that job's messages), that job is failed with the reason; otherwise the item is recorded in
the ledger's rejected list and no job is touched. Either way the worker goes on. The job inside a valid
envelope is validated again by the task (`Job.from_wire`).

`Channel.wake()` ends a BRPOP in flight at once (CLIENT UNBLOCK, Redis >= 5), so queues added while
it blocks are polled now rather than when it times out: a worker that finishes loading takes its
first job without waiting out a BRPOP on its holding queue alone (up to 1 s).
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import sys
import time

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as kombu_virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from shared import lua, redis_conn, routing
from shared.errors import Refused
from shared.ledger import Ledger
from shared.wire import RENDER_TASK

log = logging.getLogger(__name__)

EX_CONFIG = 78  # sysexits EX_CONFIG, as worker.boot: the worker cannot run as configured

# Items above this are not opened at all; a valid job message is under 100 KB (the job itself is at
# most schema.WIRE_MAX_BYTES), so nothing this large can be one.
ITEM_MAX_BYTES = 4 * 1024 * 1024
# Time limits are capped at this share of the visibility timeout: kombu restores a message unacked
# for longer than that timeout, and a job must be killed (and its message acked) before then.
TIME_LIMIT_SHARE_OF_VISIBILITY = 0.9
ID_MAX_CHARS = 255
REPR_MAX_CHARS = 10_000
ENVELOPE_KEYS = {"body", "content-encoding", "content-type", "headers", "properties"}
PROPERTY_KEYS = {"correlation_id", "reply_to", "delivery_mode", "delivery_info", "priority",
                 "body_encoding", "delivery_tag"}
# Celery's task protocol 2 headers, and `redelivered`, which kombu and our sweep add on restore.
HEADER_KEYS = {"lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
               "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
               "replaced_task_nesting", "stamped_headers", "stamps", "redelivered"}
EMBED_KEYS = {"callbacks", "errbacks", "chain", "chord"}




def _known_object(payload: dict, name: str, known: set, unknown_text: str) -> dict:
    """payload[name], which must be an object holding only known keys."""
    value = payload.get(name)
    if not isinstance(value, dict):
        raise Refused(f"envelope has no {name} object")
    unknown = sorted(set(value) - known)
    if unknown:
        raise Refused(f"{unknown_text} {unknown[0]!r:.40}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_text(headers: dict, name: str, max_chars: int) -> None:
    value = headers.get(name)
    if value is not None and (not isinstance(value, str) or len(value) > max_chars):
        raise Refused(f"header {name} must be null or a string of at most {max_chars} characters")


def _check_time_limit(headers: dict, max_s: float) -> None:
    """Refuse a time limit Celery cannot use; cap one longer than `max_s` (in place)."""
    value = headers.get("timelimit")
    if value is None:
        return
    if not isinstance(value, list) or len(value) != 2:
        raise Refused("header timelimit must be [hard, soft] (numbers or null)")
    for limit in value:
        if limit is None:
            continue
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit):
            raise Refused(f"header timelimit holds {limit!r:.40}, not a finite number")
        if limit <= 0:
            raise Refused(f"header timelimit {limit:g} s is not positive")
    # A job allowed to run past the visibility timeout would be delivered again while it still runs.
    # The producer's profile table may be older or newer than this worker's: this worker's wins.
    headers["timelimit"] = [None if limit is None else min(limit, max_s) for limit in value]


def check_envelope(payload, max_time_limit_s: float) -> None:
    """Raise Refused unless `payload` is a zfarm render message Celery can take without harm.
    A time limit over `max_time_limit_s` is lowered to it in `payload`."""
    if not isinstance(payload, dict):
        raise Refused(f"envelope is a JSON {type(payload).__name__}, not an object")
    unknown = sorted(set(payload) - ENVELOPE_KEYS)
    if unknown:
        raise Refused(f"envelope has unknown key {unknown[0]!r:.40}")
    if payload.get("content-type") != "application/json":
        raise Refused(f"content type {payload.get('content-type')!r:.60} refused: JSON only")
    if payload.get("content-encoding") != "utf-8":
        raise Refused(f"content encoding {payload.get('content-encoding')!r:.40} refused: utf-8 only")

    properties = _known_object(payload, "properties", PROPERTY_KEYS, "envelope has unknown property")
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not 0 < len(tag) <= ID_MAX_CHARS:
        raise Refused("envelope's properties.delivery_tag is not a short string")
    if properties.get("body_encoding") != "base64":
        raise Refused("envelope's properties.body_encoding is not base64")
    delivery_info = properties.get("delivery_info", {})
    if not isinstance(delivery_info, dict) or not all(
            isinstance(delivery_info.get(k, ""), str) for k in ("exchange", "routing_key")) \
            or not isinstance(delivery_info.get("redelivered", False), bool):
        raise Refused("envelope's properties.delivery_info is not {exchange, routing_key} strings")
    priority = properties.get("priority", 0)
    if not _is_int(priority) or not 0 <= priority <= 255:
        raise Refused("envelope's properties.priority is not an integer in [0, 255]")
    if not _is_int(properties.get("delivery_mode", 2)):
        raise Refused("envelope's properties.delivery_mode is not an integer")
    for name in ("correlation_id", "reply_to"):
        _optional_text(properties, name, ID_MAX_CHARS)

    headers = _known_object(payload, "headers", HEADER_KEYS, "message has unknown header")
    if headers.get("task") != RENDER_TASK:
        raise Refused(f"message names an unknown task {headers.get('task')!r:.60}: only {RENDER_TASK} "
                      "runs from zfarm queues")
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not 0 < len(task_id) <= ID_MAX_CHARS:
        raise Refused("header id is not a short string")
    for name in ("shadow", "group", "root_id", "parent_id"):
        _optional_text(headers, name, ID_MAX_CHARS)
    for name in ("argsrepr", "kwargsrepr", "origin"):
        _optional_text(headers, name, REPR_MAX_CHARS)
    if headers.get("lang", "py") != "py":
        raise Refused("header lang is not py")
    # zfarm never schedules (eta, expires), stamps or groups: they would only open more paths in Celery.
    for name in ("eta", "expires", "group_index", "stamped_headers"):
        if headers.get(name) is not None:
            raise Refused(f"header {name} must be null")
    if headers.get("stamps") not in (None, {}):
        raise Refused("header stamps must be empty")
    for name in ("retries", "replaced_task_nesting"):
        value = headers.get(name, 0)
        if not _is_int(value) or value < 0:
            raise Refused(f"header {name} is not a non-negative integer")
    for name in ("ignore_result", "redelivered"):
        if headers.get(name) is not None and not isinstance(headers.get(name), bool):
            raise Refused(f"header {name} is not a boolean")
    _check_time_limit(headers, max_time_limit_s)

    args, kwargs, embed = decode_body(payload)
    if args != [] or not isinstance(kwargs, dict) or set(kwargs) != {"job"}:
        raise Refused("body is not [[], {\"job\": ...}, {...}]: no positional arguments, one keyword 'job'")
    if embed is not None and (not isinstance(embed, dict) or set(embed) - EMBED_KEYS
                              or any(v is not None for v in embed.values())):
        raise Refused("body asks for callbacks, chains or chords, which zfarm never sends")


def decode_body(payload) -> tuple:
    """(args, kwargs, embed) from the envelope's base64 JSON body; Refused when it is not that."""
    body = payload.get("body") if isinstance(payload, dict) else None
    if not isinstance(body, str):
        raise Refused("envelope body is not a string")
    try:
        decoded = json.loads(base64.b64decode(body, validate=True).decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise Refused(f"body is not base64 JSON: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(decoded, list) or len(decoded) != 3:
        raise Refused("body is not a JSON array of [args, kwargs, embed]")
    return tuple(decoded)


def is_checked_queue(queue: str) -> bool:
    """Whether items popped from `queue` are checked: zfarm's own queues (`routing.is_zfarm_queue`: the
    job queues and the holding queue a loading worker consumes). Celery's own
    queues, such as the `<uuid>.reply.celery.pidbox` lists that `celery inspect`, `celery status` and
    Flower read the workers' replies from (in the same BRPOP as any task queue), take kombu's stock
    path: their messages are no render jobs, and checking them dropped every reply."""
    return routing.is_zfarm_queue(queue)


def message_task_id(payload):
    """The task id a refused envelope claims (headers.id), whatever its type, or None."""
    headers = payload.get("headers") if isinstance(payload, dict) else None
    return headers.get("id") if isinstance(headers, dict) else None


def named_job(payload):
    """The `job` object a refused envelope's body carries, if its body can be read as JSON at all
    (whatever content type it claims: JSON is parsed, never anything else)."""
    try:
        _args, kwargs, _embed = decode_body(payload)
    except Refused:
        return None
    return kwargs.get("job") if isinstance(kwargs, dict) else None


# Items a worker popped from a queue whose fate Redis never recorded. kombu's Redis transport takes a
# message with BRPOP, which removes it, and only then writes it to the `unacked` hash; when that write
# fails (Redis killed, a network cut, a Redis out of memory), the message is in no queue, in no
# unacked entry and claimed by nobody, so kombu's restore cannot find it and the job would wait for
# the ledger's slower lost-message sweep (`worker.sweeper`). Such items are kept here, per process
# because kombu builds a new channel on reconnect, and pushed back to the head of their queue before
# this process pops anything else.
_popped_unrecorded: list[tuple[bytes, bytes]] = []


def popped_unrecorded() -> list[tuple[bytes, bytes]]:
    """(queue key, item) of every item this process popped and has not yet handed back."""
    return list(_popped_unrecorded)


def hand_back_unrecorded(client) -> int:
    """Push every popped, unrecorded item back to the head of its queue. Returns how many."""
    handed = 0
    while _popped_unrecorded:
        key, item = _popped_unrecorded[-1]  # the last popped goes back first: the first ends at the head
        # RPUSH: consumers BRPOP from the right, so the item is taken next, as it would have been.
        client.rpush(key, item)
        _popped_unrecorded.pop()
        handed += 1
        log.warning("handed back to %s an item popped as the connection to Redis broke", bytes_to_str(key))
    return handed


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, each record and ack one script (`shared/lua/unacked_*.lua`) instead of a
    MULTI/EXEC of two commands: the same keys and values, one command from the worker instead of four."""

    def append(self, message, delivery_tag):
        delivery = message.delivery_info
        entry = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self.channel.conn_or_acquire() as client:
            _script(client, "unacked_add")(keys=[self.unacked_index_key, self.unacked_key],
                                          args=[delivery_tag, time.time(), entry])
        kombu_virtual.QoS.append(self, message, delivery_tag)
        # In the unacked hash now: from here kombu's restore and zfarm's sweep can find it.
        self.channel._popped = None

    def ack(self, delivery_tag):
        with self.channel.conn_or_acquire() as client:
            _script(client, "unacked_remove")(keys=[self.unacked_index_key, self.unacked_key], args=[delivery_tag])
        kombu_virtual.QoS.ack(self, delivery_tag)


def _script(client, name: str):
    """Script `name` of shared/lua on `client`: EVALSHA, loaded once per Redis (again after a restart)."""
    return client.register_script(lua.source(name))


def stop_on_refused_credentials(kombu_connection, error: Exception) -> None:
    """Redis refused the broker URL's credentials (a password rotated under a running worker, say):
    a configuration error, so stop the process with exit 78 and say why. kombu counts it a connection
    error (redis-py's AuthenticationError is one) and Celery would retry it forever. Celery's worker
    stops with a SystemExit's code."""
    message = redis_conn.auth_failure(kombu_connection.as_uri(), kombu_connection.password is not None, error)
    log.critical("zfarm worker stops: %s", message)
    print(f"zfarm: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EX_CONFIG)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _popped: tuple[bytes, bytes] | None = None
    # (socket, the server's id for it, None where the server refused to say) of the connection BRPOP
    # blocks on; a reconnect makes a new socket, whose id is asked again.
    _blocking_client: tuple[object, int | None] | None = None

    def __init__(self, *args, **kwargs):
        try:
            super().__init__(*args, **kwargs)  # kombu PINGs here, on every (re)connect
        except redis.AuthenticationError as exc:
            stop_on_refused_credentials(self.connection.client, exc)

    def _brpop_start(self, timeout=None):
        self._push_back_unrecorded()
        self._learn_blocking_client_id()
        return super()._brpop_start(timeout)

    def _learn_blocking_client_id(self) -> None:
        """Ask the server, once per connection, which client id the BRPOP connection has."""
        connection = self.client.connection
        sock = getattr(connection, "_sock", None)
        if sock is None or (self._blocking_client is not None and self._blocking_client[0] is sock):
            return
        try:
            connection.send_command("CLIENT", "ID")
            self._blocking_client = (sock, int(connection.read_response()))
        except self.connection_errors:
            raise  # the BRPOP that follows would fail the same way; kombu reconnects
        except Exception as exc:  # a server without CLIENT ID (Redis < 5): no wake-ups, BRPOPs time out
            self._blocking_client = (sock, None)
            log.info("no CLIENT ID from the broker (%s): added queues are polled after the BRPOP timeout", exc)

    def wake(self) -> bool:
        """End the BRPOP in flight now, as if it had timed out; kombu then BRPOPs again, on the queues
        consumed by then. False when none was blocked (the next BRPOP has the queues anyway)."""
        if not self._in_poll or self._blocking_client is None or self._blocking_client[1] is None:
            return False
        try:
            with self.conn_or_acquire() as client:
                return bool(client.client_unblock(self._blocking_client[1]))
        except Exception as exc:  # refused (an ACL without CLIENT, say) or Redis away: the BRPOP times out
            log.warning("could not wake the BRPOP in flight (%s: %s); added queues are polled after its timeout",
                        type(exc).__name__, exc)
            return False

    def close(self):
        # kombu's close reads the reply of a BRPOP in flight (a message popped then is not lost): with
        # a 5 s BRPOP that made every stop wait up to 5 s. Ended now, the read returns at once.
        if self._in_poll:
            self.wake()
        super().close()

    def _push_back_unrecorded(self) -> None:
        if _popped_unrecorded:
            with self.conn_or_acquire() as client:
                hand_back_unrecorded(client)

    def _brpop_read(self, **options):
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            key, item = dest__item
            self._popped = (key, item)
            try:
                self._take(bytes_to_str(key).rsplit(self.sep, 1)[0], item)
            except Exception as exc:  # a broken connection mostly; whatever it is, the item was not recorded
                if self._popped is not None:
                    _popped_unrecorded.append(self._popped)
                    log.error("the item just popped from %s was not recorded (%s: %s); it goes back to its "
                              "queue before the next pop", bytes_to_str(key), type(exc).__name__, exc)
                raise
            finally:
                self._popped = None
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _take(self, dest: str, item: bytes) -> None:
        """Deliver a popped item to Celery (kombu records it as unacked first), or refuse it."""
        self._queue_cycle.rotate(dest)
        if not is_checked_queue(dest):
            # kombu's own path for Celery's queues (kombu.transport.redis.Channel._brpop_read).
            self.connection._deliver(loads(bytes_to_str(item)), dest)
            return
        payload = None
        try:
            if len(item) > ITEM_MAX_BYTES:
                raise Refused(f"queue item is {len(item)} bytes; a job message is far smaller")
            try:
                payload = json.loads(item)
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                raise Refused(f"queue item is not JSON: {type(exc).__name__}: {exc}"[:300]) from None
            check_envelope(payload, self.visibility_timeout * TIME_LIMIT_SHARE_OF_VISIBILITY)
        except Refused as refusal:
            self._refuse_item(dest, item, payload, str(refusal))
            self._popped = None
            return
        self.connection._deliver(payload, dest)

    def _refuse_item(self, queue: str, item: bytes, payload, problem: str) -> None:
        """Fail the job a refused item names, or else record the item as rejected."""
        with self.conn_or_acquire() as client:
            ledger = Ledger(client)
            reason = {"kind": "invalid", "field": "message", "message": problem}
            task_id = message_task_id(payload)
            if ledger.fail_invalid_message(named_job(payload), reason, task_id):
                log.warning("failed the job named by a queue item from %s: %s", queue, problem)
                return
            ledger.reject(problem, {"queue": queue, "task_id": task_id if isinstance(task_id, str) else None,
                                    "body_prefix": repr(item[:200])})
        log.warning("dropped a queue item from %s: %s", queue, problem)


# How long a BRPOP blocks before it is sent again. kombu's 1 s made every idle worker cost Redis a
# BRPOP over its 48 queues each second (0.13 ms of Redis CPU each); a job pushed to a queue wakes a
# blocked BRPOP at once whatever this is, queues added while one blocks end it through `wake()`, and
# a half-open connection is still dropped after this plus health_check_interval.
BRPOP_TIMEOUT_S = 5


class Transport(kombu_redis.Transport):
    Channel = Channel
    brpop_timeout = BRPOP_TIMEOUT_S


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same hardened channel on kombu's Sentinel transport: each new connection goes to the
    primary the sentinels name now, so after a failover the worker reconnects to the promoted replica.

    The broker URL names one sentinel (`shared.redis_conn.broker_url`: kombu would swap this
    transport for its stock one on moving to another URL of a list); every sentinel comes in the
    `sentinels` transport option and each is asked in turn."""

    from_transport_options = kombu_redis.SentinelChannel.from_transport_options + ("sentinels",)
    sentinels: list | None = None

    def _sentinel_managed_pool(self, asynchronous=False):
        if not self.sentinels:
            return super()._sentinel_managed_pool(asynchronous)
        params = self._connparams(asynchronous)
        params.pop("host", None)
        params.pop("port", None)
        manager = kombu_redis.sentinel.Sentinel(
            [tuple(s) for s in self.sentinels], min_other_sentinels=getattr(self, "min_other_sentinels", 0),
            sentinel_kwargs=getattr(self, "sentinel_kwargs", None), **params)
        # Kept so kombu closes its connections to the sentinels with the channel (celery/kombu#1108).
        if asynchronous:
            self._async_sentinel_manager = manager
        else:
            self._sentinel_manager = manager
        if getattr(self, "master_name", None) is None:
            raise ValueError("'master_name' transport option must be specified.")
        credentials = {k: params[k] for k in ("username", "password") if k in params}
        return manager.master_for(self.master_name, kombu_redis.redis.Redis, **credentials).connection_pool


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
    brpop_timeout = BRPOP_TIMEOUT_S
