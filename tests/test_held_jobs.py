"""A job claimed by a live worker that no longer holds its message is handed back by the sweep.

What a Sentinel failover (or an AOF restart that lost its last second) can leave: the worker ran a
job's finish and ack on the old primary and moved on, the new primary still shows the job running
under that worker's claim, its message unacked. Each heartbeat reports the jobs the worker holds;
the sweep compares. Real redis-server; a real worker process for the heartbeat's report.
"""
from __future__ import annotations

import json
import time

import pytest

from farm import wait_for
from shared import keys, registry
from worker.sweeper import HOLD_REPORT_MARGIN_S, sweep_dead_claims

MIN_AGE_S = 15.0


def take(client, farm_factory, storage_url, taken_ago_s: float):
    """Submit one job and move its message into kombu's unacked hash, taken `taken_ago_s` ago and
    claimed in the ledger by instance i1 of worker w@box. Returns (batch, queue)."""
    batch = farm_factory(storage_url).submit([{"prompt": "held or not", "seed": 1, "width": 512, "height": 512}])
    [queue] = [q.decode() for q in client.keys("zfarm.*") if client.type(q) == b"list" and client.llen(q)]
    message = json.loads(client.rpop(queue))
    client.hset(keys.KOMBU_UNACKED, "tag-1", json.dumps([message, "", queue]))
    client.zadd(keys.KOMBU_UNACKED_INDEX, {"tag-1": time.time() - taken_ago_s})
    client.hset(keys.batch_states(batch.id), 0, "running")
    client.hset(keys.batch_running(batch.id), 0, "w@box/i1")
    return batch, queue


def report(client, jobs: str | None, last_seen: float) -> None:
    fields = {"instance": "i1", "last_seen": last_seen, **({"jobs": jobs} if jobs is not None else {})}
    client.hset(keys.worker("w@box"), mapping=fields)


def sweep(client) -> int:
    client.delete(keys.SWEEP_LOCK)
    return sweep_dead_claims(client, lock_s=0.01, min_age_s=MIN_AGE_S)


def test_a_job_its_live_claimant_reports_not_holding_goes_back_to_the_head_of_its_queue(
        redis_client, farm_factory, file_storage_url):
    batch, queue = take(redis_client, farm_factory, file_storage_url, taken_ago_s=30)
    report(redis_client, jobs="", last_seen=time.time())

    assert sweep(redis_client) == 1
    assert redis_client.hlen(keys.KOMBU_UNACKED) == 0
    assert json.loads(redis_client.lindex(queue, -1))["headers"]["redelivered"] is True


@pytest.mark.parametrize("jobs, reported_after_taken_s", [
    ("{batch}/0", 10.0),                       # it still holds the job
    ("", HOLD_REPORT_MARGIN_S / 2),            # its report came too soon after the message was taken
    (None, 10.0),                              # a worker that reports nothing (an older version)
])
def test_a_job_its_live_claimant_holds_or_has_not_reported_on_stays_with_it(
        redis_client, farm_factory, file_storage_url, jobs, reported_after_taken_s):
    batch, queue = take(redis_client, farm_factory, file_storage_url, taken_ago_s=30)
    taken_at = time.time() - 30
    report(redis_client, None if jobs is None else jobs.format(batch=batch.id), taken_at + reported_after_taken_s)

    assert sweep(redis_client) == 0
    assert redis_client.hlen(keys.KOMBU_UNACKED) == 1 and redis_client.llen(queue) == 0


def test_a_worker_reports_the_job_it_renders_with_each_heartbeat_and_none_once_done(
        redis_client, start_worker, farm_factory, file_storage_url):
    worker = start_worker(file_storage_url, ("--simulate", "3"))
    batch = farm_factory(file_storage_url).submit([{"prompt": "a held job", "seed": 2}])
    name = worker.registration["name"]

    wait_for(lambda: redis_client.hget(keys.worker(name), "jobs") == f"{batch.id}/0".encode(), 20,
             what="the heartbeat to report the job in progress")
    assert sweep(redis_client) == 0
    wait_for(lambda: batch.status()["done"] == 1 and redis_client.hget(keys.worker(name), "jobs") == b"", 30,
             what="the heartbeat to report no job once it is done")
    assert registry.is_alive(redis_client, name)
