"""Hand jobs held by dead workers back to their queues.

kombu keeps every delivered, unacknowledged message in the `unacked` hash until it is acked, and
restores it only after the visibility timeout, which must outlast the longest healthy job (many
minutes). A worker killed mid-render (kill -9, OOM killer, a preempted VM) is noticed much sooner:
its registry entry stops being refreshed and expires. Each worker's parent runs this sweep every
heartbeat; a lock lets one worker at a time do it.
"""
from __future__ import annotations

import base64
import json
import logging

import redis

from shared import keys, registry

log = logging.getLogger(__name__)


def _job_ref(payload: dict):
    """(batch_id, index) named by a Celery envelope, or None."""
    try:
        body = payload["body"]
        if payload.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
        job = kwargs["job"]
        return str(job["batch_id"]), int(job["index"])
    except (KeyError, ValueError, TypeError):
        return None


def _instance_alive(client: redis.Redis, claim: str, cache: dict) -> bool:
    if claim not in cache:
        name, _, instance = claim.rpartition("/")
        current = client.hget(keys.worker(name), "instance")
        cache[claim] = current is not None and current.decode() == instance
    return cache[claim]


def restore(client: redis.Redis, tag: bytes) -> bool:
    """Move one unacked message back to the head of its queue, as kombu's restore does."""
    def transaction(pipe):
        raw = pipe.hget(keys.KOMBU_UNACKED, tag)
        pipe.multi()
        pipe.zrem(keys.KOMBU_UNACKED_INDEX, tag)
        pipe.hdel(keys.KOMBU_UNACKED, tag)
        if raw:
            payload, _exchange, routing_key = json.loads(raw)
            payload.setdefault("headers", {})["redelivered"] = True
            payload.get("properties", {}).get("delivery_info", {})["redelivered"] = True
            # RPUSH: consumers BRPOP from the right, so the restored job is taken next.
            pipe.rpush(routing_key, json.dumps(payload))
        return bool(raw)

    return client.transaction(transaction, keys.KOMBU_UNACKED, value_from_callable=True)


def sweep_dead_claims(client: redis.Redis, lock_s: float) -> int:
    """Restore every unacked job whose ledger claim names a worker instance that is gone."""
    if not client.set(keys.SWEEP_LOCK, b"1", nx=True, px=int(lock_s * 1000)):
        return 0
    restored = 0
    alive: dict[str, bool] = {}
    for tag, raw in client.hgetall(keys.KOMBU_UNACKED).items():
        try:
            payload, _exchange, _routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        ref = _job_ref(payload)
        if ref is None:
            continue
        batch_id, index = ref
        try:
            claim = client.hget(keys.batch_running(batch_id), index)
        except redis.ResponseError:
            continue
        if claim is None or _instance_alive(client, claim.decode(), alive):
            continue
        if restore(client, tag):
            restored += 1
            log.warning("job %s/%d was held by %s, which is gone: handed back", batch_id, index, claim.decode())
    return restored
