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

A live claimant can also have let go of a job: after a Sentinel failover (or an AOF restart that lost
its last second) the new primary may lack a job's finish and ack, which the worker ran on the old one
before moving on, and still show the job running under its claim. Each heartbeat says which jobs the
worker holds (`held_jobs`); a message whose claimant reported, after the message was taken, that it
does not hold the job is handed back like a dead worker's, rather than waiting out the visibility
timeout. Its re-render lands at the same key and is counted once.

A message can also vanish: kombu takes it with BRPOP and only then records it as unacked, so a
worker killed, or a Redis killed, in the moment between leaves a job that no queue, no unacked
entry and no claim holds (`worker.transport` hands back what a surviving worker popped; this covers
the rest). Every sweep compares, in one atomic read, the jobs the ledger counts queued or running
with the job messages that exist. Only when fewer messages exist does it read every queue, find the
unfinished jobs without one, and queue such a job again once it has stayed without one for
`confirm_s` (a pop is recorded within milliseconds; a worker silent for that long is dead).
"""
from __future__ import annotations

import json
import logging
import time

import redis

from shared import keys, lua, routing
from shared.ledger import FINAL_STATES, Ledger, job_ref
from worker.transport import named_job

log = logging.getLogger(__name__)


# A worker's heartbeat must come this long after a message was taken before its report of the jobs
# it holds says anything about that message (the parent reserves a message within milliseconds).
HOLD_REPORT_MARGIN_S = 2.0


def _claimant(client: redis.Redis, claim: str, cache: dict) -> tuple[bool, float, set | None]:
    """(alive, last heartbeat, jobs held at it, None when not reported) of the instance a claim names."""
    if claim not in cache:
        name, _, instance = claim.rpartition("/")
        current, last_seen, held = client.hmget(keys.worker(name), "instance", "last_seen", "jobs")
        alive = current is not None and current.decode() == instance
        cache[claim] = (alive, float(last_seen or 0), None if held is None else set(filter(None, held.decode().split(","))))
    return cache[claim]


def _instance_alive(client: redis.Redis, claim: str, cache: dict) -> bool:
    return _claimant(client, claim, cache)[0]


def _let_go(client: redis.Redis, claim: str, ref: tuple[str, int], taken_at: float, cache: dict) -> bool:
    """Whether the live instance of `claim` has reported, since the message was taken, that it does
    not hold the job `ref`."""
    _alive, last_seen, held = _claimant(client, claim, cache)
    return held is not None and last_seen >= taken_at + HOLD_REPORT_MARGIN_S and f"{ref[0]}/{ref[1]}" not in held


def held_jobs() -> str:
    """The jobs ("batch/index", comma-separated) of the messages this worker process holds: taken
    and not yet acknowledged. The parent's heartbeat reports them (`worker.registration`)."""
    from celery.worker import state as worker_state

    refs = set()
    for request in list(worker_state.reserved_requests) + list(worker_state.active_requests):
        try:
            ref = job_ref((request.kwargs or {}).get("job"))
        except Exception:  # a request whose body never decoded names no job
            ref = None
        if ref is not None:
            refs.add(f"{ref[0]}/{ref[1]}")
    return ",".join(sorted(refs))


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


def sweep_dead_claims(client: redis.Redis, lock_s: float | None, min_age_s: float) -> int:
    """Restore every unacked job message, taken at least `min_age_s` ago, that no live worker
    instance claims in the ledger. Returns how many. With `lock_s`, only if this call takes the sweep
    lock for that long; None when the caller holds it (`worker.housekeeping`)."""
    if lock_s is not None and not client.set(keys.SWEEP_LOCK, b"1", nx=True, px=int(lock_s * 1000)):
        return 0
    taken = dict(client.zrangebyscore(keys.KOMBU_UNACKED_INDEX, 0, time.time() - min_age_s, withscores=True))
    if not taken:
        return 0
    tags = list(taken)
    restored = 0
    alive: dict = {}
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
        let_go = False
        if claim is not None and _instance_alive(client, claim.decode(), alive):
            let_go = _let_go(client, claim.decode(), ref, taken[tag], alive)
            if not let_go:
                continue
        if restore(client, tag):
            restored += 1
            holder = claim.decode() if claim is not None else "a worker that never claimed it"
            log.warning("job %s/%d was held by %s, which %s: handed back", batch_id, index, holder,
                        "no longer holds it" if let_go else "is gone")
    return restored


def message_deficit(client: redis.Redis, queues: list[str]) -> int:
    """How many more jobs the ledger counts running, or queued in the tiers of `queues`, than job
    messages exist in `queues` and the unacked hash. Above zero, some job may have lost its message;
    at or below zero, none has, unless leftover messages of finished or cancelled jobs hide it until
    they are consumed."""
    active = [b.decode() for b in client.smembers(keys.ACTIVE_BATCHES)]
    if not active:
        return 0
    tiers = sorted({parsed[1] for parsed in map(routing.parse_queue, queues) if parsed})
    return int(client.eval(lua.source("message_deficit"), 1 + len(active), keys.KOMBU_UNACKED,
                           *[keys.batch_counts(b) for b in active], len(tiers), *tiers, *queues))


def _message_ref(raw: bytes) -> tuple[str, int] | None:
    """(batch_id, index) a queue item or an unacked entry ([message, exchange, routing key]) names."""
    try:
        payload = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return None
    if isinstance(payload, list) and payload:
        payload = payload[0]
    return job_ref(named_job(payload))


def jobs_without_message(client: redis.Redis, queues: list[str]) -> dict[str, list[int]]:
    """Per active batch, the jobs that are queued, or running under a claim no live worker instance
    holds, and have no message in `queues` nor in the unacked hash: one atomic read of them all."""
    active = sorted(b.decode() for b in client.smembers(keys.ACTIVE_BATCHES))
    with client.pipeline(transaction=True) as pipe:
        for queue in queues:
            pipe.lrange(queue, 0, -1)
        pipe.hvals(keys.KOMBU_UNACKED)
        for batch_id in active:
            pipe.hmget(keys.batch_counts(batch_id), "total")
            pipe.hget(keys.batch_meta(batch_id), "cancelled")
            pipe.hgetall(keys.batch_states(batch_id))
            pipe.hgetall(keys.batch_running(batch_id))
        replies = pipe.execute()
    present = {ref for items in replies[:len(queues) + 1] for ref in map(_message_ref, items) if ref}
    per_batch = replies[len(queues) + 1:]
    alive: dict = {}
    out: dict[str, list[int]] = {}
    for n, batch_id in enumerate(active):
        (total,), cancelled, states, running = per_batch[4 * n:4 * n + 4]
        states = {int(i): v.decode() for i, v in states.items()}
        running = {int(i): v.decode() for i, v in running.items()}
        lost = []
        for index in range(int(total or 0)):
            if (batch_id, index) in present:
                continue
            state = states.get(index)
            if state is None and cancelled != b"1":
                lost.append(index)
            elif state == "running" and not _instance_alive(client, running.get(index, "/"), alive):
                lost.append(index)
        if lost:
            out[batch_id] = lost
    return out


def requeue_lost_jobs(client: redis.Redis, queues: list[str], time_limit_for, confirm_s: float,
                      lock_s: float | None) -> int:
    """Queue again every unfinished job that has had no message for at least `confirm_s`, going by
    the suspects earlier calls recorded. Returns how many. `queues` is every job queue workers
    consume; a job whose queue is not among them is left alone (no worker would take it anyway)."""
    if lock_s is not None and not client.set(keys.LOST_SCAN_LOCK, b"1", nx=True, px=int(lock_s * 1000)):
        return 0
    if message_deficit(client, queues) <= 0:
        client.delete(keys.LOST_SUSPECTS)
        return 0
    # The full read below is heavy on a long queue: at most two or three of them per confirm period,
    # even where a deficit persists that no scan can resolve (a lane beyond the workers' ZFARM_LANES).
    throttle_px = int(max(lock_s or 0, confirm_s / 2) * 1000)
    if lock_s is None:
        if not client.set(keys.LOST_SCAN_LOCK, b"1", nx=True, px=throttle_px):
            return 0
    else:
        client.set(keys.LOST_SCAN_LOCK, b"1", px=throttle_px)
    now = time.time()
    lost = jobs_without_message(client, queues)
    refs = {f"{batch_id}/{index}": (batch_id, index) for batch_id, indexes in lost.items() for index in indexes}
    seen = {k.decode(): float(v) for k, v in client.hgetall(keys.LOST_SUSPECTS).items()}
    with client.pipeline(transaction=False) as pipe:
        if set(seen) - set(refs):
            pipe.hdel(keys.LOST_SUSPECTS, *(set(seen) - set(refs)))
        if set(refs) - set(seen):
            pipe.hset(keys.LOST_SUSPECTS, mapping={ref: now for ref in set(refs) - set(seen)})
        pipe.execute()
    confirmed: dict[str, list[int]] = {}
    for ref, (batch_id, index) in refs.items():
        if ref in seen and now - seen[ref] >= confirm_s:
            confirmed.setdefault(batch_id, []).append(index)
    ledger, family, requeued = Ledger(client), set(queues), 0
    for batch_id, indexes in confirmed.items():
        lane = int(client.hget(keys.batch_meta(batch_id), "lane") or 0)

        def queue_for(job, lane=lane):
            queue = routing.queue(job.priority, job.tier, lane)
            return queue if queue in family else None

        queued_again = ledger.requeue_lost(batch_id, indexes, queue_for, time_limit_for)
        requeued += len(queued_again)
        client.hdel(keys.LOST_SUSPECTS, *(f"{batch_id}/{index}" for index in indexes))
        for index in queued_again:
            log.warning("job %s/%d had no message in any queue for %.0f s (lost between a pop and its "
                        "record): queued again", batch_id, index, now - seen[f"{batch_id}/{index}"])
    return requeued
