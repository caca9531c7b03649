"""The private kombu and Celery internals zfarm's worker overrides or calls are still there, in the form
the worker was written against. A kombu or Celery release that changes one fails here, naming it, rather
than in a running farm. pyproject.toml pins both to the minor release these tests pass on.

Public hooks were looked for first: Celery's consumer hooks (`on_decode_error`, `on_unknown_task`...)
run only after kombu has parsed an item, and stock kombu parses it inside its event loop, where junk
stops the worker; nothing public ends a BRPOP in flight. So the transport overrides kombu's own.
"""
from __future__ import annotations

import hashlib
import inspect

import pytest
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as kombu_virtual
from kombu.utils.scheduling import round_robin_cycle

# (owner, name, parameters after self): methods zfarm overrides or calls, and their signatures.
METHODS = [
    (kombu_redis.Channel, "_brpop_start", ["timeout"]),
    (kombu_redis.Channel, "_brpop_read", ["options"]),
    (kombu_redis.Channel, "_flush_brpop_reauth", []),
    (kombu_redis.Channel, "conn_or_acquire", ["client"]),
    (kombu_redis.QoS, "append", ["message", "delivery_tag"]),
    (kombu_redis.QoS, "ack", ["delivery_tag"]),
    (kombu_virtual.QoS, "append", ["message", "delivery_tag"]),
    (kombu_virtual.QoS, "ack", ["delivery_tag"]),
    (kombu_redis.Channel, "_connparams", ["asynchronous"]),
    (kombu_redis.SentinelChannel, "_sentinel_managed_pool", ["asynchronous"]),
    (kombu_virtual.Transport, "_deliver", ["message", "queue"]),
    (round_robin_cycle, "consume", ["n"]),
    (round_robin_cycle, "rotate", ["last_used"]),
    (Consumer, "on_decode_error", ["message", "exc"]),
    (Consumer, "on_unknown_message", ["body", "message"]),
    (Consumer, "on_unknown_task", ["body", "message", "exc"]),
    (Consumer, "on_invalid_task", ["body", "message", "exc"]),
    (Request, "on_timeout", ["soft", "timeout"]),
    (Request, "on_failure", ["exc_info", "send_failed_event", "return_ok"]),
]
# Attributes the transport reads or sets on a kombu Redis channel (some are set in its __init__).
CHANNEL_ATTRIBUTES = ["_in_poll", "connection_errors", "visibility_timeout", "brpop_timeout", "_queue_cycle",
                      "client", "connection"]
# worker.transport.Channel._brpop_read is kombu's own with one change (items are checked before
# delivery): a new kombu body must be read and the copy brought up to date before this is changed.
COPIED_BODIES = {(kombu_redis.Channel, "_brpop_read"): "c42518699709",
                 # worker.transport.QoS writes the same keys and values, each in one script.
                 (kombu_redis.QoS, "append"): "35c655f6ecc6",
                 (kombu_redis.QoS, "ack"): "1bc15a4ddf54",
                 # worker.transport.SentinelChannel's: kombu's, with the sentinels from a transport option.
                 (kombu_redis.SentinelChannel, "_sentinel_managed_pool"): "bde54a2d6e93"}


@pytest.mark.parametrize("owner, name, expected", METHODS, ids=[f"{o.__name__}.{n}" for o, n, _ in METHODS])
def test_an_overridden_internal_keeps_its_signature(owner, name, expected):
    method = getattr(owner, name, None)
    assert method is not None, f"{owner.__module__}.{owner.__qualname__}.{name} is gone"
    params = [p for p in inspect.signature(method).parameters if p != "self"]
    assert params == expected, (f"{owner.__module__}.{owner.__qualname__}.{name} now takes {params}, "
                                f"zfarm was written for {expected}")


def test_every_channel_attribute_the_transport_uses_is_still_there(redis_server):
    from kombu import Connection

    with Connection(redis_server, transport="worker.transport:Transport") as connection:
        channel = connection.channel()
        try:
            missing = [name for name in CHANNEL_ATTRIBUTES if not hasattr(channel, name)]
            assert not missing, f"kombu.transport.redis.Channel no longer has {missing}"
            assert channel._in_poll in (False, None)
        finally:
            channel.close()


@pytest.mark.parametrize("owner, name", list(COPIED_BODIES), ids=[n for _, n in COPIED_BODIES])
def test_a_kombu_method_the_transport_copies_is_unchanged(owner, name):
    source = inspect.getsource(getattr(owner, name))
    fingerprint = hashlib.sha256(source.encode()).hexdigest()[:12]
    assert fingerprint == COPIED_BODIES[(owner, name)], (
        f"kombu's {owner.__qualname__}.{name} changed (fingerprint {fingerprint}): compare it with "
        f"worker.transport's copy and bring it up to date")


def test_the_worker_transport_is_kombus_redis_transport_with_zfarms_channel():
    from worker import transport

    assert issubclass(transport.Transport, kombu_redis.Transport)
    assert transport.Transport.Channel is transport.Channel
    assert issubclass(transport.Channel, kombu_redis.Channel) and transport.Channel.QoS is transport.QoS


def test_the_sentinel_transport_is_kombus_with_the_same_hardened_channel():
    from worker import transport

    assert issubclass(transport.SentinelTransport, kombu_redis.SentinelTransport)
    assert transport.SentinelTransport.Channel is transport.SentinelChannel
    assert issubclass(transport.SentinelChannel, transport.Channel)
    assert issubclass(transport.SentinelChannel, kombu_redis.SentinelChannel)
    # kombu's Sentinel channel still keeps its managers where kombu closes them, and takes these options.
    assert {"master_name", "sentinel_kwargs", "min_other_sentinels"} <= set(kombu_redis.SentinelChannel.from_transport_options)
    assert "_sentinel_manager" in inspect.getsource(kombu_redis.Channel._disconnect_pools)
