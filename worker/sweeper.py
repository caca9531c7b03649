"""Hand jobs held by dead workers back to their queues.

kombu keeps every delivered, unacknowledged message in the `unacked` hash until it is acked, and
restores it only after the visibility timeout, which must outlast the longest healthy job (many
minutes). A worker killed mid-render (kill -9, OOM killer, a preempted VM) is noticed much sooner:
its registry entry stops being refreshed and expires. Each worker's parent runs this sweep every
heartbeat; a lock lets one worker at a time do it.

A message is handed back when no live worker instance claims its job in the ledger: its claim
names an instance that is gone, or the job was never claimed (the worker died between taking the
message and claiming the job). Only messages taken at least `min_age_s` ago are looked at, so a
live worker that has just taken one has time to claim it. A message whose job is already final is
left alone: its worker is acking it (a draining worker acks only after its grace period), or died
just before; kombu's visibility restore brings such a leftover back, to be skipped.
"""
from __future__ import annotations

import json
import logging
import time

import redis

from shared import keys
from shared.ledger import FINAL_STATES, job_ref
from worker.transport import named_job

log = logging.getLogger(__name__)


def _instance_alive(client: redis.Redis, claim: str, cache: dict) -> bool:
    if claim not in cache:
        name, _, instance = claim.rpartition("/")
        current = client.hget(keys.worker(name), "instance")
        cache[claim] = current is not None and current.decode() == instance
    return cache[claim]


def _state(client: redis.Redis, batch_id: str, index: int) -> str | None:
    raw = client.hget(keys.batch_states(batch_id), index)
    return raw.decode() if raw is not None else None


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


def sweep_dead_claims(client: redis.Redis, lock_s: float, min_age_s: float) -> int:
    """Restore every unacked job message, taken at least `min_age_s` ago, that no live worker
    instance claims in the ledger. Returns how many."""
    if not client.set(keys.SWEEP_LOCK, b"1", nx=True, px=int(lock_s * 1000)):
        return 0
    tags = client.zrangebyscore(keys.KOMBU_UNACKED_INDEX, 0, time.time() - min_age_s)
    if not tags:
        return 0
    restored = 0
    alive: dict[str, bool] = {}
    for tag, raw in zip(tags, client.hmget(keys.KOMBU_UNACKED, tags)):
        if raw is None:
            continue  # acked since the index was read
        try:
            payload, _exchange, _routing_key = json.loads(raw)
        except (ValueError, TypeError):
            log.warning("unacked entry %r is not a kombu message; left to kombu's own restore", tag[:100])
            continue
        # Not a job message: the transport refuses those before they are ever unacked.
        ref = job_ref(named_job(payload))
        if ref is None:
            continue
        batch_id, index = ref
        try:
            claim = client.hget(keys.batch_running(batch_id), index)
            if claim is None and _state(client, batch_id, index) in FINAL_STATES:
                continue
        except redis.ResponseError as exc:  # a key of another type: one bad entry must not stop the sweep
            log.warning("cannot read the claim on %s/%d: %s", batch_id, index, exc)
            continue
        if claim is not None and _instance_alive(client, claim.decode(), alive):
            continue
        if restore(client, tag):
            restored += 1
            holder = claim.decode() if claim is not None else "a worker that never claimed it"
            log.warning("job %s/%d was held by %s, which is gone: handed back", batch_id, index, holder)
    return restored
