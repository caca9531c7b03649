"""A job whose message vanished between a worker's BRPOP and kombu's unacked record is queued again.

Real redis-server; the producer's own submit path. Popping a message with RPOP and dropping it is
exactly what a worker killed (or a Redis killed) between the pop and its record leaves behind.
"""
from __future__ import annotations

import json

from farm import wait_for
from farm_fixtures import TEST_TABLE
from shared import keys, profiles, routing
from shared.ledger import Ledger
from shared.settings import Settings
from worker.sweeper import jobs_without_message, message_deficit, requeue_lost_jobs
from worker.transport import named_job

CONFIRM_S = 0.5


def job_queues() -> list[str]:
    """Every queue the producer of `farm_factory` can fill (its lanes are the default)."""
    return routing.all_job_queues(profiles.load_table(TEST_TABLE), Settings.from_env({}).lanes)


def time_limit_for(job) -> float:
    return 60.0


def submit(client, farm_factory, file_storage_url, n: int):
    """A batch of `n` small jobs, and the one queue they went to."""
    batch = farm_factory(file_storage_url).submit(
        [{"prompt": f"lost {i}", "seed": i, "width": 512, "height": 512} for i in range(n)])
    [queue] = [q for q in job_queues() if client.llen(q)]
    return batch, queue


def task_index(raw: bytes) -> int:
    return named_job(json.loads(raw))["index"]


def sweep(client) -> int:
    return sweep_with(client, job_queues())


def sweep_with(client, queues: list[str]) -> int:
    client.delete(keys.LOST_SCAN_LOCK)  # each call here sweeps; workers take turns through the lock
    return requeue_lost_jobs(client, queues, time_limit_for, confirm_s=CONFIRM_S, lock_s=0.01)


def test_a_job_whose_message_vanished_is_queued_again_at_the_head_once_it_has_had_none_for_the_confirm_period(
        redis_client, farm_factory, file_storage_url):
    batch, queue = submit(redis_client, farm_factory, file_storage_url, 3)
    popped = redis_client.rpop(queue)
    assert task_index(popped) == 0
    assert message_deficit(redis_client, job_queues()) == 1
    assert jobs_without_message(redis_client, job_queues()) == {batch.id: [0]}

    assert sweep(redis_client) == 0  # first seen: it may still be between a pop and its record
    assert redis_client.hkeys(keys.LOST_SUSPECTS) == [f"{batch.id}/0".encode()]
    assert wait_for(lambda: sweep(redis_client), 10, interval_s=0.1, what="the lost job to be queued again") == 1

    assert [task_index(raw) for raw in redis_client.lrange(queue, 0, -1)] == [2, 1, 0]
    assert message_deficit(redis_client, job_queues()) == 0
    assert sweep(redis_client) == 0
    assert redis_client.exists(keys.LOST_SUSPECTS) == 0
    status = Ledger(redis_client).status(batch.id)  # the accounting is untouched: still 3 queued
    assert (status["total"], status["queued"], status["running"], status["done"]) == (3, 3, 0, 0)


def test_a_message_recorded_as_unacked_soon_after_its_pop_is_not_queued_twice(
        redis_client, farm_factory, file_storage_url):
    batch, queue = submit(redis_client, farm_factory, file_storage_url, 2)
    popped = redis_client.rpop(queue)
    assert sweep(redis_client) == 0
    # The worker's record lands: kombu's unacked entry is [message, exchange, routing key].
    redis_client.hset(keys.KOMBU_UNACKED, "tag-1", json.dumps([json.loads(popped), "", queue]))
    redis_client.zadd(keys.KOMBU_UNACKED_INDEX, {"tag-1": 0})

    assert message_deficit(redis_client, job_queues()) == 0
    assert sweep(redis_client) == 0
    assert redis_client.llen(queue) == 1
    assert redis_client.exists(keys.LOST_SUSPECTS) == 0


def test_jobs_of_a_cancelled_batch_and_jobs_claimed_by_a_live_worker_are_never_counted_lost(
        redis_client, farm_factory, file_storage_url):
    cancelled, queue = submit(redis_client, farm_factory, file_storage_url, 2)
    cancelled.cancel()
    redis_client.delete(queue)  # workers would only have skipped these messages
    assert jobs_without_message(redis_client, job_queues()) == {}

    running, queue = submit(redis_client, farm_factory, file_storage_url, 1)
    redis_client.rpop(queue)
    redis_client.hset(keys.worker("w@box"), "instance", "i1")
    redis_client.hset(keys.batch_states(running.id), 0, "running")
    redis_client.hset(keys.batch_running(running.id), 0, "w@box/i1")
    assert jobs_without_message(redis_client, job_queues()) == {}
    redis_client.delete(keys.worker("w@box"))  # the claimant is gone
    assert jobs_without_message(redis_client, job_queues()) == {running.id: [0]}


def test_jobs_queued_in_a_tier_no_worker_here_consumes_make_no_deficit(
        redis_client, farm_factory, file_storage_url):
    batch, queue = submit(redis_client, farm_factory, file_storage_url, 2)
    redis_client.rpop(queue)
    _, tier, _ = routing.parse_queue(queue)
    other_tiers = [q for q in job_queues() if routing.parse_queue(q)[1] != tier]

    assert message_deficit(redis_client, job_queues()) == 1
    assert message_deficit(redis_client, other_tiers) == 0
    assert sweep_with(redis_client, other_tiers) == 0
    assert redis_client.exists(keys.LOST_SUSPECTS) == 0
