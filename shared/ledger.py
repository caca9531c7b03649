"""The batch ledger: the one owner of job accounting in Redis.

Each transition is one atomic step (a MULTI/EXEC or a Lua script from `shared/lua/`), so the counts
always add up: total = queued + running + done + failed + cancelled. A job's state hash entry makes every
transition idempotent: a message delivered twice (after a crash) is rendered again at most, and
counted once.
"""
from __future__ import annotations

import json
import re
import time
import uuid

import redis

from shared import keys, lua
from shared.errors import LedgerError
from shared.registry import EMA_WEIGHT
from shared.schema import Job, JobError, check_id, job_id
from shared.wire import render_message

FINAL_STATES = ("done", "failed", "cancelled")
# A job is started at most this many times: a prompt that kills every worker it reaches fails
# instead of going round forever.
MAX_ATTEMPTS = 5
COUNT_FIELDS = ("queued", "running", "done", "failed", "cancelled")


def job_ref(raw_job) -> tuple[str, int] | None:
    """(batch_id, index) that a job's wire form names, read leniently from a message that may be
    invalid otherwise, or None when it names no job well enough to fail one."""
    if not isinstance(raw_job, dict):
        return None
    index = raw_job.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        return None
    try:
        return check_id(raw_job.get("batch_id")), index
    except JobError:
        return None


# What follows a job's id in the task id of its own messages: nothing (submitted), -r<n> (queued
# again by requeue_failed), -lost-<8 hex> (queued again by requeue_lost).
_OWN_MESSAGE_SUFFIX = re.compile(r"(-r[1-9][0-9]{0,8}|-lost-[0-9a-f]{8})?")


def is_own_message_id(task_id, batch_id: str, index: int) -> bool:
    """Whether `task_id` is one the farm gives the messages of job `index` of `batch_id`:
    `job_id(batch_id, index)` when submitted, `{job_id}-r{n}` when retried, `{job_id}-lost-{hex}` when
    queued again after its message was lost."""
    if not isinstance(task_id, str):
        return False
    base = job_id(batch_id, index)
    return task_id.startswith(base) and _OWN_MESSAGE_SUFFIX.fullmatch(task_id[len(base):]) is not None


class Ledger:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._start = client.register_script(lua.source("start"))
        self._finish = client.register_script(lua.source("finish"))
        self._cancel = client.register_script(lua.source("cancel"))

    # Producer side
    def create_batch(self, batch_id: str, meta: dict, jobs: list[Job], queued: list[tuple[str, str]],
                     idempotency_key: str = "") -> tuple[str, bool]:
        """Store a batch and queue its messages in one transaction: all or nothing.

        `queued` holds (queue, message) pairs. Returns (batch_id, created); with an idempotency
        key already used, returns the earlier batch's id and False."""
        check_id(batch_id)
        tiers: dict[str, int] = {}
        for job in jobs:
            tiers[job.tier] = tiers.get(job.tier, 0) + 1
        counts = {"total": len(jobs), "queued": len(jobs), "running": 0, "done": 0, "failed": 0, "cancelled": 0}
        counts.update({f"queued:{tier}": n for tier, n in tiers.items()})
        idem_key = keys.idempotency(idempotency_key) if idempotency_key else None
        by_queue: dict[str, list[str]] = {}
        for queue, message in queued:
            by_queue.setdefault(queue, []).append(message)
        executed = False
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    # The batch's key is watched: when Redis restarts after running the EXEC but
                    # before replying, the client's retry ends in a WatchError here, and the batch found
                    # stored is this one, not queued a second time.
                    pipe.watch(keys.batch_meta(batch_id), *([idem_key] if idem_key else []))
                    if executed and pipe.exists(keys.batch_meta(batch_id)):
                        pipe.reset()
                        return batch_id, True
                    if idem_key:
                        earlier = pipe.get(idem_key)
                        if earlier:
                            pipe.reset()
                            return earlier.decode(), False
                    pipe.multi()
                    pipe.hset(keys.batch_meta(batch_id), mapping={k: _text(v) for k, v in meta.items()})
                    pipe.hset(keys.batch_counts(batch_id), mapping=counts)
                    chunk = 2000
                    for start in range(0, len(jobs), chunk):
                        pipe.hset(keys.batch_jobs(batch_id), mapping={
                            j.index: json.dumps(j.to_wire(), separators=(",", ":")) for j in jobs[start:start + chunk]})
                    pipe.zadd(keys.BATCHES, {batch_id: float(meta.get("created_at", time.time()))})
                    pipe.sadd(keys.ACTIVE_BATCHES, batch_id)
                    for queue, messages in by_queue.items():
                        for start in range(0, len(messages), chunk):
                            pipe.lpush(queue, *messages[start:start + chunk])
                    if idem_key:
                        pipe.set(idem_key, batch_id)
                    executed = True
                    pipe.execute()
                    return batch_id, True
                except redis.WatchError:
                    continue

    def cancel(self, batch_id: str) -> int:
        """Mark every job not yet started as cancelled; returns how many. Workers skip them."""
        check_id(batch_id)
        n = self._cancel(keys=[keys.batch_counts(batch_id), keys.batch_meta(batch_id), keys.ACTIVE_BATCHES,
                               keys.FINISHED_EVENTS], args=[time.time(), batch_id])
        if n == -1:
            raise LedgerError(f"no batch {batch_id}")
        return int(n)

    def requeue_failed(self, batch_id: str, queue_for, time_limit_for) -> int:
        """Queue the failed jobs of a batch again, and only those. Returns how many. A cancelled batch is
        refused (LedgerError): its requeued jobs would be skipped and never finish."""
        check_id(batch_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(keys.batch_failures(batch_id), keys.batch_states(batch_id))
                    if not pipe.exists(keys.batch_meta(batch_id)):
                        raise LedgerError(f"no batch {batch_id}")
                    if pipe.hget(keys.batch_meta(batch_id), "cancelled") == b"1":
                        # Workers skip every job of a cancelled batch: requeued, these would wait forever.
                        raise LedgerError(f"batch {batch_id} was cancelled: its failed jobs are not queued again "
                                          "(submit them as a new batch)")
                    failed = [int(i) for i in pipe.hkeys(keys.batch_failures(batch_id))]
                    if not failed:
                        pipe.reset()
                        return 0
                    raw_jobs = pipe.hmget(keys.batch_jobs(batch_id), failed)
                    attempt = int(pipe.hget(keys.batch_meta(batch_id), "retries") or 0) + 1
                    pipe.multi()
                    tiers: dict[str, int] = {}
                    for index, raw in zip(failed, raw_jobs):
                        job = Job.from_wire(json.loads(raw))
                        tiers[job.tier] = tiers.get(job.tier, 0) + 1
                        pipe.lpush(queue_for(job), render_message(
                            job.to_wire(), f"{job.id}-r{attempt}", queue_for(job), time_limit_for(job)))
                    pipe.hdel(keys.batch_states(batch_id), *failed)
                    pipe.hdel(keys.batch_attempts(batch_id), *failed)
                    pipe.delete(keys.batch_failures(batch_id))
                    pipe.hincrby(keys.batch_counts(batch_id), "failed", -len(failed))
                    pipe.hincrby(keys.batch_counts(batch_id), "queued", len(failed))
                    for tier, n in tiers.items():
                        pipe.hincrby(keys.batch_counts(batch_id), f"queued:{tier}", n)
                    pipe.hset(keys.batch_meta(batch_id), "retries", attempt)
                    pipe.hdel(keys.batch_meta(batch_id), "finished_at")
                    pipe.sadd(keys.ACTIVE_BATCHES, batch_id)
                    pipe.execute()
                    return len(failed)
                except redis.WatchError:
                    continue

    def requeue_lost(self, batch_id: str, indexes: list[int], queue_for, time_limit_for) -> list[int]:
        """Queue a new message, at the head of its queue, for each job of `indexes` that is still
        queued or running: jobs whose message was lost (the caller has made sure of that). Returns
        the indexes queued again; a job that finished meanwhile, or for which `queue_for` gives
        None, is left alone."""
        check_id(batch_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(keys.batch_states(batch_id))
                    states = pipe.hmget(keys.batch_states(batch_id), indexes) if indexes else []
                    todo = [i for i, st in zip(indexes, states) if st is None or st == b"running"]
                    raw_jobs = pipe.hmget(keys.batch_jobs(batch_id), todo) if todo else []
                    pipe.multi()
                    queued = []
                    for index, raw in zip(todo, raw_jobs):
                        if raw is None:
                            continue
                        job = Job.from_wire(json.loads(raw))
                        queue = queue_for(job)
                        if queue is None:
                            continue
                        # RPUSH: consumers BRPOP from the right, so the job that waited longest goes next.
                        pipe.rpush(queue, render_message(job.to_wire(), f"{job.id}-lost-{uuid.uuid4().hex[:8]}",
                                                         queue, time_limit_for(job)))
                        queued.append(index)
                    pipe.execute()
                    return queued
                except redis.WatchError:
                    continue

    def status(self, batch_id: str) -> dict:
        """Counts, metadata and failure reasons in one round trip, whatever the batch size."""
        with self.redis.pipeline(transaction=False) as pipe:
            self.queue_status(pipe, batch_id)
            return self.parse_status(batch_id, pipe.execute())

    @staticmethod
    def queue_status(pipe, batch_id: str) -> None:
        """Queue the status reads on `pipe`, so a caller can add its own reads to the same round trip."""
        check_id(batch_id)
        pipe.hgetall(keys.batch_meta(batch_id))
        pipe.hgetall(keys.batch_counts(batch_id))
        pipe.hgetall(keys.batch_failures(batch_id))

    @staticmethod
    def parse_status(batch_id: str, replies: list) -> dict:
        """The status dict from the first three replies of a pipeline filled by `queue_status`."""
        meta, counts, failures = replies[:3]
        if not meta:
            raise LedgerError(f"no batch {batch_id}")
        meta = {k.decode(): v.decode() for k, v in meta.items()}
        counts = {k.decode(): int(v) for k, v in counts.items()}
        out = {"batch_id": batch_id, "name": meta.get("name", ""), "priority": meta.get("priority", "normal"),
               "total": counts.get("total", 0)}
        out.update({f: counts.get(f, 0) for f in COUNT_FIELDS})
        out["queued_by_tier"] = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("queued:") and v}
        out["failures"] = sorted(({"index": int(i), **json.loads(r)} for i, r in failures.items()),
                                 key=lambda f: f["index"])
        out["created_at"] = float(meta.get("created_at", 0))
        out["finished_at"] = float(meta["finished_at"]) if meta.get("finished_at") else None
        out["cancelled_batch"] = meta.get("cancelled") == "1"
        out["meta"] = meta
        return out

    def backlog(self) -> dict[str, tuple[int, float]]:
        """Jobs not yet finished across active batches, by size tier: tier -> (jobs, work units).

        A batch's work per job is its submitted average (`work_units` / `total` in its metadata);
        running jobs count whole, in their batch's largest tier."""
        active = sorted(b.decode() for b in self.redis.smembers(keys.ACTIVE_BATCHES))
        with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in active:
                pipe.hgetall(keys.batch_counts(batch_id))
                pipe.hmget(keys.batch_meta(batch_id), "total", "work_units")
            replies = pipe.execute()
        out: dict[str, list] = {}
        for counts, (total, work_units) in zip(replies[::2], replies[1::2]):
            counts = {k.decode(): int(v) for k, v in counts.items()}
            per_job = float(work_units) / max(1, int(total)) if work_units and total else 1.0
            tiers = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("queued:") and v > 0}
            if counts.get("running", 0) > 0:
                biggest = max(tiers, default="any", key=lambda t: (t != "any", t))
                tiers[biggest] = tiers.get(biggest, 0) + counts["running"]
            for tier, n in tiers.items():
                entry = out.setdefault(tier, [0, 0.0])
                entry[0] += n
                entry[1] += n * per_job
        return {tier: (n, round(w, 3)) for tier, (n, w) in out.items()}

    def jobs(self, batch_id: str) -> dict[int, dict]:
        raw = self.redis.hgetall(keys.batch_jobs(check_id(batch_id)))
        return {int(i): json.loads(v) for i, v in raw.items()}

    def states(self, batch_id: str) -> dict[int, str]:
        raw = self.redis.hgetall(keys.batch_states(check_id(batch_id)))
        return {int(i): v.decode() for i, v in raw.items()}

    # Worker side
    def start(self, job: Job, worker: str, max_attempts: int = MAX_ATTEMPTS) -> str:
        """'run' to render a queued job; 'rerun' to render one another delivery claimed before (look
        again before storing: that delivery may still be rendering it); 'done'/'failed'/'cancelled' to
        skip; 'unknown' for a job not on record; 'exhausted' when the job was started `max_attempts`
        times already."""
        b = job.batch_id
        result = self._start(keys=[keys.batch_counts(b), keys.batch_states(b), keys.batch_running(b),
                                   keys.batch_meta(b), keys.batch_attempts(b), keys.batch_jobs(b)],
                             args=[job.index, worker, job.tier, max_attempts])
        return result.decode() if isinstance(result, bytes) else result

    def finish(self, job_batch_id: str, index: int, outcome: str, reason: dict | None = None,
               tier: str = "any", worker: str | None = None, s_per_image: float | None = None) -> bool:
        """Record a job's final outcome once. Returns False if it was already final.

        `tier` counts only for a stored job without one: the stored job's tier is the truth.
        `worker`, when given, is the worker whose render this outcome is: its jobs_done or jobs_failed
        goes up in the same atomic step, and `s_per_image` (this render's seconds per 1024x1024 8-step
        image) goes into its moving-average speed. The client retries a call whose reply a Redis
        restart cut off; counted apart, such a retry counted the job twice (or, for the transition,
        not at all)."""
        if outcome not in ("done", "failed"):
            raise LedgerError(f"bad outcome {outcome}")
        reason_json = json.dumps(reason or {}, separators=(",", ":"))
        stats_key = [keys.worker_stats(worker)] if worker else []
        sample = "" if s_per_image is None or s_per_image < 0 else f"{s_per_image:.6f}"
        b = job_batch_id
        n = self._finish(keys=[keys.batch_counts(b), keys.batch_states(b), keys.batch_running(b),
                               keys.batch_failures(b), keys.batch_meta(b), keys.ACTIVE_BATCHES, keys.FINISHED_EVENTS,
                               keys.batch_jobs(b), *stats_key],
                         args=[index, outcome, reason_json, time.time(), job_batch_id, tier, sample, EMA_WEIGHT])
        if n == -1:
            raise LedgerError(f"no job {index} in batch {job_batch_id}")
        return n == 1

    def fail_invalid(self, raw_job, reason: dict) -> bool:
        """Fail the job an invalid message names, if it names one of a batch on record that is not
        final yet. False when it names none: the caller records the message as rejected instead."""
        ref = job_ref(raw_job)
        if ref is None:
            return False
        try:
            return self.finish(ref[0], ref[1], "failed", reason)
        except LedgerError:
            return False  # no such batch or job: the message is junk, not a job

    def fail_invalid_message(self, raw_job, reason: dict, task_id) -> bool:
        """`fail_invalid` for a message that failed validation, but only when it is the named job's own
        message (`is_own_message_id`). A message under any other id must not fail the job: the job's
        own, valid message may still be queued and would then be skipped. False: the caller records
        the message as rejected."""
        ref = job_ref(raw_job)
        if ref is None or not is_own_message_id(task_id, *ref):
            return False
        return self.fail_invalid(raw_job, reason)

    def state(self, batch_id: str, index: int) -> str | None:
        """running, done, failed or cancelled; None while queued (or when there is no such job)."""
        raw = self.redis.hget(keys.batch_states(check_id(batch_id)), index)
        return raw.decode() if raw is not None else None

    def running_jobs(self, batch_id: str) -> dict[int, str]:
        raw = self.redis.hgetall(keys.batch_running(check_id(batch_id)))
        return {int(i): w.decode() for i, w in raw.items()}

    def reject(self, reason: str, detail: dict) -> None:
        """Record a message that names no valid job, so it is failed visibly, not dropped."""
        record = json.dumps({"at": time.time(), "reason": reason, **detail}, separators=(",", ":"), default=str)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpush(keys.REJECTED, record)
            pipe.ltrim(keys.REJECTED, 0, keys.REJECTED_MAX - 1)
            pipe.execute()

    def rejected(self, limit: int = 100) -> list[dict]:
        return [json.loads(r) for r in self.redis.lrange(keys.REJECTED, 0, limit - 1)]


def _text(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)
