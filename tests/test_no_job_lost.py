"""No job lost: every accepted job ends as exactly one stored result or as failed with a stored
reason, through worker crashes, shutdowns, time limits, Redis and storage outages, resubmissions
and junk in the queues.

Real processes throughout: a private redis-server (AOF where it restarts), moto's S3 server (a
versioned bucket, so every write of a result can be counted), `python -m worker` subprocesses with
the simulated renderer. Each test ends on exact counts: total = done + failed (+ cancelled), with
failures only where the input or the scenario deserved them.
"""
from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest
import redis

from farm import REPO, RedisServer, S3Server, WorkerProcess, base_env, s3_env, wait_for
from farm_fixtures import TEST_TABLE
from shared import keys, profiles, registry, routing, wire
from shared.ledger import MAX_ATTEMPTS, Ledger
from shared.schema import job_id

FAST_S = 0.05       # simulated seconds per 1024x1024 8-step image: a quick job
SLOW_S = 60.0       # a job that is surely still rendering when the test acts on it
READY_TIMEOUT_S = 60.0
RECOVERY_LIMIT_S = 30.0
REDIS_DOWN_S = 6.0  # longer than the tests' registry TTL (4 s)


class Rig:
    """One farm for one test: redis-server, moto S3 with a versioned bucket, worker subprocesses."""

    def __init__(self, tmp_path, appendonly: bool = False):
        self.tmp_path = tmp_path
        self.redis = RedisServer(tmp_path / "redis", appendonly=appendonly).start()
        self.s3 = S3Server().start()
        self.bucket = f"nojoblost-{uuid.uuid4().hex[:10]}"
        s3 = self.s3.client()
        s3.create_bucket(Bucket=self.bucket)
        s3.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})
        self.storage_url = f"s3://{self.bucket}/results"
        self.workers: list[WorkerProcess] = []
        self.client = self.redis.client()
        self.ledger = Ledger(self.client)

    def worker(self, name: str, simulate_s: float = FAST_S, wait_ready: bool = True, **env) -> WorkerProcess:
        """Start `python -m worker --simulate S` named `name@farm`; wait until it consumes."""
        name = full_name(name)
        extra = {"ZFARM_PROFILE_TABLE": str(TEST_TABLE), "ZFARM_WORKER_NAME": name, **s3_env(self.s3), **env}
        proc = WorkerProcess(base_env(self.redis.url, self.storage_url, **extra), ["--simulate", str(simulate_s)],
                             self.tmp_path / f"worker-{name}-{len(self.workers)}.log").start()
        self.workers.append(proc)
        proc.name = name
        if wait_ready:
            def ready():
                if proc.proc.poll() is not None:
                    raise RuntimeError(f"worker {name} exited with {proc.proc.returncode}:\n{proc.output()[-3000:]}")
                return any(w.get("pid") == proc.proc.pid and w.get("state") == "ready"
                           for w in registry.live_workers(self.client))
            wait_for(ready, READY_TIMEOUT_S, what=f"worker {name} to be ready")
        return proc

    def farm(self, redis_retry_s: float = 60.0):
        from producer.api import Farm

        return Farm.from_env(table=profiles.load_table(TEST_TABLE), redis_retry_s=redis_retry_s,
                             redis_url=self.redis.url, storage_url=self.storage_url,
                             s3_endpoint_url=self.s3.endpoint_url)

    def versions(self, batch_id: str) -> dict[str, list[bytes]]:
        """Every stored version of every result object of a batch: {name: [bytes, ...]}."""
        s3 = self.s3.client()
        out: dict[str, list[bytes]] = {}
        prefix = f"results/{batch_id}/"
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=prefix):
            for version in page.get("Versions", []):
                body = s3.get_object(Bucket=self.bucket, Key=version["Key"], VersionId=version["VersionId"])["Body"]
                out.setdefault(version["Key"][len("results/"):], []).append(body.read())
        return out

    def claim(self, batch_id: str, index: int) -> str | None:
        raw = self.client.hget(keys.batch_running(batch_id), index)
        return raw.decode() if raw is not None else None

    def attempts(self, batch_id: str, index: int) -> int:
        return int(self.client.hget(keys.batch_attempts(batch_id), index) or 0)

    def jobs_done_by(self, name: str) -> int:
        return int(self.client.hget(keys.worker_stats(full_name(name)), "jobs_done") or 0)

    def close(self, failed: bool) -> None:
        for proc in self.workers:
            proc.kill_group()  # a SIGTERM would wait out the grace period of a job still rendering
            proc.stop()
        if failed:
            for proc in self.workers:
                print(f"--- {proc.log_path.name} ---\n{proc.output()[-5000:]}")
        self.s3.stop()
        self.redis.kill()


@pytest.fixture
def rig(tmp_path, monkeypatch, request):
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    made: list[Rig] = []

    def make(appendonly: bool = False) -> Rig:
        made.append(Rig(tmp_path, appendonly))
        return made[-1]

    yield make
    report = getattr(request.node, "rep_call", None)
    for one in made:
        one.close(failed=report is None or report.failed)


def full_name(name: str) -> str:
    """Worker names carry a host part; tests name workers by the part before it."""
    return name if "@" in name else f"{name}@farm"


def specs(n: int, size_px: int = 1024, tag: str = "job") -> list[dict]:
    return [{"prompt": f"{tag} number {i}", "seed": 1000 + i, "width": size_px, "height": size_px}
            for i in range(n)]


def finished(batch, timeout_s: float = 90) -> dict:
    def done():
        status = batch.status()
        return status if status["finished"] else None
    return wait_for(done, timeout_s, interval_s=0.1, what=f"batch {batch.id} to finish")


def counts(status: dict) -> tuple:
    return status["total"], status["done"], status["failed"], status["cancelled"], status["queued"], status["running"]


def claimed_by(rig: Rig, batch_id: str, name: str, timeout_s: float = 30) -> int:
    """Wait until worker `name` has claimed a job of the batch; returns its index."""
    def claimed():
        return next((i for i, w in rig.ledger.running_jobs(batch_id).items()
                     if w.startswith(f"{full_name(name)}/")), None)
    return wait_for(lambda: (lambda i: (i,) if i is not None else None)(claimed()), timeout_s,
                    what=f"{name} to start a job of {batch_id}")[0]


def assert_each_result_stored_once(rig: Rig, batch_id: str, total: int, may_repeat=frozenset()) -> None:
    """Every job's PNG and sidecar stored at its key, each written once. Jobs in `may_repeat` (in
    flight when storage went away: a PUT may land while its reply is lost) may have been written
    again, to the same key with the same image."""
    versions = rig.versions(batch_id)
    assert sorted(versions) == sorted(f"{batch_id}/{i:06d}.{ext}" for i in range(total) for ext in ("png", "json"))
    rewritten = {name: len(v) for name, v in versions.items()
                 if len(v) > 1 and int(name.split("/")[1].split(".")[0]) not in may_repeat}
    assert rewritten == {}
    assert all(len(set(v)) == 1 for name, v in versions.items() if name.endswith(".png"))


# Worker killed

def test_a_worker_killed_mid_render_has_its_job_finished_by_another_worker_within_30_s(rig):
    farm_rig = rig()
    slow = farm_rig.worker("doomed", simulate_s=SLOW_S)
    farm = farm_rig.farm()
    batch = farm.submit(specs(4))
    index = claimed_by(farm_rig, batch.id, "doomed")
    farm_rig.worker("rescuer", simulate_s=FAST_S)
    wait_for(lambda: batch.status()["done"] == 3, 30, what="the rescuer to render the other jobs")

    killed_at = time.monotonic()
    slow.kill_group()
    status = finished(batch, RECOVERY_LIMIT_S + 10)
    recovery_s = time.monotonic() - killed_at

    assert recovery_s < RECOVERY_LIMIT_S
    assert counts(status) == (4, 4, 0, 0, 0, 0)
    assert farm_rig.attempts(batch.id, index) == 2
    sidecar = json.loads(farm.storage.get(f"{batch.id}/{index:06d}.json"))
    assert sidecar["worker"] == full_name("rescuer")
    assert_each_result_stored_once(farm_rig, batch.id, 4)
    assert farm_rig.jobs_done_by("rescuer") == 4 and farm_rig.jobs_done_by("doomed") == 0


def test_a_worker_killed_mid_render_finishes_the_job_itself_when_restarted(rig):
    farm_rig = rig()
    first = farm_rig.worker("phoenix", simulate_s=SLOW_S)
    farm = farm_rig.farm()
    batch = farm.submit(specs(1))
    claimed_by(farm_rig, batch.id, "phoenix")

    killed_at = time.monotonic()
    first.kill_group()
    farm_rig.worker("phoenix", simulate_s=FAST_S)
    status = finished(batch, RECOVERY_LIMIT_S + 10)

    assert time.monotonic() - killed_at < RECOVERY_LIMIT_S
    assert counts(status) == (1, 1, 0, 0, 0, 0)
    assert farm_rig.attempts(batch.id, 0) == 2
    assert_each_result_stored_once(farm_rig, batch.id, 1)


def test_a_job_whose_render_kills_its_worker_every_time_fails_after_max_attempts_with_the_reason(rig):
    farm_rig = rig()
    worker = farm_rig.worker("oom-victim", simulate_s=SLOW_S)
    batch = farm_rig.farm().submit(specs(1))
    for attempt in range(1, MAX_ATTEMPTS + 1):
        wait_for(lambda: farm_rig.attempts(batch.id, 0) == attempt and farm_rig.claim(batch.id, 0), 30,
                 what=f"attempt {attempt} to start")
        # The pool process renders; killing it is what the OOM killer does to a render gone wrong.
        children = psutil.Process(worker.proc.pid).children()
        assert len(children) == 1
        children[0].kill()
        children[0].wait(10)
    status = finished(batch, 30)

    assert counts(status) == (1, 0, 1, 0, 0, 0)
    failure = status["failures"][0]
    assert failure["kind"] == "worker-lost" and f"started {MAX_ATTEMPTS} times" in failure["message"]
    assert farm_rig.attempts(batch.id, 0) == MAX_ATTEMPTS + 1
    assert worker.proc.poll() is None
    assert farm_rig.versions(batch.id) == {}


def test_a_job_that_hits_an_internal_error_on_every_attempt_is_handed_back_then_failed_after_max_attempts(rig):
    farm_rig = rig()
    batch = farm_rig.farm().submit(specs(1))
    # A ledger key of the wrong type: claiming the job raises inside the worker, not the job's fault.
    farm_rig.client.set(keys.batch_running(batch.id), "not a hash")
    worker = farm_rig.worker("unlucky", simulate_s=FAST_S)
    status = finished(batch, 60)

    assert counts(status) == (1, 0, 1, 0, 0, 0)
    assert status["failures"][0]["kind"] == "worker-lost"
    assert farm_rig.attempts(batch.id, 0) == MAX_ATTEMPTS + 1
    assert worker.output().count("handing it back to the queue") == MAX_ATTEMPTS
    assert farm_rig.client.hlen(keys.KOMBU_UNACKED) == 0 and worker.proc.poll() is None


# SIGTERM

def test_sigterm_lets_a_job_shorter_than_the_grace_period_finish_then_the_worker_exits_0_and_deregisters(rig):
    farm_rig = rig()
    grace_s = 6.0
    worker = farm_rig.worker("spot", simulate_s=2.0, ZFARM_SHUTDOWN_GRACE_S=grace_s)
    farm = farm_rig.farm()
    batch = farm.submit(specs(3))
    index = claimed_by(farm_rig, batch.id, "spot")

    signalled_at = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(grace_s + 20) == 0
    assert time.monotonic() - signalled_at < grace_s + 10

    status = farm_rig.ledger.status(batch.id)  # the ledger's own counts: no live worker serves the rest now
    assert (status["done"], status["failed"], status["queued"], status["running"]) == (1, 0, 2, 0)
    assert farm_rig.ledger.state(batch.id, index) == "done"
    assert json.loads(farm.storage.get(f"{batch.id}/{index:06d}.json"))["worker"] == full_name("spot")
    assert full_name("spot") not in [w["name"] for w in registry.live_workers(farm_rig.client)]

    farm_rig.worker("next", simulate_s=FAST_S)
    status = finished(batch)
    assert counts(status) == (3, 3, 0, 0, 0, 0)
    assert farm_rig.attempts(batch.id, index) == 1
    assert farm_rig.jobs_done_by("spot") == 1 and farm_rig.jobs_done_by("next") == 2
    assert_each_result_stored_once(farm_rig, batch.id, 3)


def test_sigterm_hands_a_job_longer_than_the_grace_period_back_and_another_worker_completes_it_once(rig):
    farm_rig = rig()
    grace_s = 2.0
    worker = farm_rig.worker("spot", simulate_s=SLOW_S, ZFARM_SHUTDOWN_GRACE_S=grace_s)
    farm = farm_rig.farm()
    batch = farm.submit(specs(1))
    claimed_by(farm_rig, batch.id, "spot")
    farm_rig.worker("steady", simulate_s=FAST_S)

    signalled_at = time.monotonic()
    worker.signal(signal.SIGTERM)
    status = finished(batch, grace_s + 20)
    handed_over_s = time.monotonic() - signalled_at
    assert worker.proc.wait(20) == 0

    assert handed_over_s < grace_s + 10  # at the end of the grace period, not after a registry TTL
    assert counts(status) == (1, 1, 0, 0, 0, 0)
    assert farm_rig.attempts(batch.id, 0) == 2
    assert json.loads(farm.storage.get(f"{batch.id}/000000.json"))["worker"] == full_name("steady")
    assert full_name("spot") not in [w["name"] for w in registry.live_workers(farm_rig.client)]
    assert_each_result_stored_once(farm_rig, batch.id, 1)
    assert farm_rig.jobs_done_by("steady") == 1 and farm_rig.jobs_done_by("spot") == 0


# Time limits

def set_time_limit(client, batch_id: str, index: int, hard_s, soft_s) -> None:
    """Rewrite one queued message's `timelimit` header, as a producer with tiny limits would send it."""
    for queue in client.keys("zfarm.*"):
        for raw in client.lrange(queue, 0, -1):
            envelope = json.loads(raw)
            if envelope["headers"]["id"] == f"{batch_id}-{index:06d}":
                envelope["headers"]["timelimit"] = [hard_s, soft_s]
                client.lset(queue, client.lpos(queue, raw), json.dumps(envelope))
                return
    raise AssertionError(f"no queued message for job {index}")


def test_a_job_over_its_hard_or_soft_time_limit_fails_with_that_reason_and_the_worker_renders_on(rig):
    farm_rig = rig()
    farm = farm_rig.farm()
    batch = farm.submit(specs(2))
    set_time_limit(farm_rig.client, batch.id, 0, 1.5, None)   # killed by the pool after 1.5 s
    set_time_limit(farm_rig.client, batch.id, 1, 10, 1)       # SoftTimeLimitExceeded inside the render
    worker = farm_rig.worker("timed", simulate_s=8.0)
    status = finished(batch, 60)

    assert counts(status) == (2, 0, 2, 0, 0, 0)
    reasons = {f["index"]: f for f in status["failures"]}
    assert reasons[0]["kind"] == "time-limit" and "hard time limit of 1.5 s" in reasons[0]["message"]
    assert reasons[1]["kind"] == "time-limit" and "exceeded its time limit" in reasons[1]["message"]
    assert farm_rig.versions(batch.id) == {}

    after = farm.submit([{"prompt": "after the time limits", "seed": 1, "width": 256, "height": 256}])
    assert counts(finished(after)) == (1, 1, 0, 0, 0, 0)
    assert worker.proc.poll() is None


def test_every_message_a_producer_queues_carries_a_hard_time_limit_within_the_visibility_timeout(
        farm_factory, file_storage_url, redis_client):
    farm = farm_factory(file_storage_url)
    farm.submit([{"prompt": "small", "width": 256, "height": 256, "steps": 1},
                 {"prompt": "largest", "width": 2048, "height": 2048, "steps": 50}], allow_pending=True)
    table = profiles.load_table(TEST_TABLE)
    limits = [json.loads(raw)["headers"]["timelimit"]
              for queue in redis_client.keys("zfarm.*") for raw in redis_client.lrange(queue, 0, -1)]
    assert len(limits) == 2
    for hard_s, soft_s in limits:
        assert 0 < soft_s < hard_s <= routing.job_time_limit_s(2048 * 2048, 50, table, farm.settings.job_margin)
        assert hard_s < routing.visibility_timeout_s(table, farm.settings.job_margin)


@pytest.mark.parametrize("table_path", [TEST_TABLE, None, "empty"])
@pytest.mark.parametrize("margin", [1.0, 3.0])
def test_the_visibility_timeout_exceeds_the_time_limit_of_a_2048px_50_step_job_on_the_slowest_class(
        table_path, margin, tmp_path):
    if table_path == "empty":
        table_path = tmp_path / "none.json"  # nothing measured: the unmeasured default speed
    table = profiles.load_table(table_path)
    longest_s = routing.job_time_limit_s(2048 * 2048, 50, table, margin)
    assert longest_s >= margin * routing.slowest_s_per_image(table) * routing.work_units(2048 * 2048, 50)
    assert routing.visibility_timeout_s(table, margin) > longest_s
    # Every job a producer can queue has a limit no longer than that one.
    for side_px, steps in ((256, 1), (1024, 8), (2048, 8), (1024, 50)):
        assert routing.job_time_limit_s(side_px * side_px, steps, table, margin) <= longest_s


def test_the_worker_app_derives_its_visibility_timeout_and_default_time_limit_from_the_profile_table():
    code = ("import json; from worker.app import app; o = app.conf.broker_transport_options; "
            "print(json.dumps([o['visibility_timeout'], app.conf.task_time_limit]))")
    env = dict(os.environ, ZFARM_PROFILE_TABLE=str(TEST_TABLE), PYTHONPATH=str(REPO))
    visibility_s, time_limit_s = json.loads(subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout)
    table = profiles.load_table(TEST_TABLE)
    assert time_limit_s == routing.job_time_limit_s(2048 * 2048, 50, table, 3.0)
    assert visibility_s == routing.visibility_timeout_s(table, 3.0) > time_limit_s


# Redis restart

def test_redis_killed_and_restarted_with_aof_mid_batch_loses_no_job_and_counts_each_once(rig):
    farm_rig = rig(appendonly=True)
    workers = [farm_rig.worker(f"w{i}", simulate_s=FAST_S) for i in range(2)]
    farm = farm_rig.farm()
    batch = farm.submit(specs(200, size_px=512))
    wait_for(lambda: batch.status()["done"] >= 50, 60, what="a quarter of the batch")

    farm_rig.redis.kill()
    killed_at = time.monotonic()
    # A worker waiting on its queue notices at once; one caught mid-job notices only after the job's own
    # Redis writes, which wait for Redis to come back, so one noticing is what can be waited for here.
    wait_for(lambda: any("Connection to broker lost" in w.output() for w in workers), 30, what="a worker to notice")
    # A producer submits while Redis is away: its client retries with backoff until Redis is back.
    late: dict = {}
    submitter = threading.Thread(target=lambda: late.update(batch=farm_rig.farm().submit(specs(20, 512, "late"))))
    submitter.start()
    # Down for longer than a registry TTL: every worker looks dead when Redis is back.
    wait_for(lambda: time.monotonic() - killed_at >= REDIS_DOWN_S, REDIS_DOWN_S + 5, interval_s=0.2,
             what="the outage to last")
    farm_rig.redis.start()
    submitter.join(60)
    assert "batch" in late

    first, second = finished(batch, 120), finished(late["batch"], 60)
    assert counts(first) == (200, 200, 0, 0, 0, 0)
    assert counts(second) == (20, 20, 0, 0, 0, 0)
    assert sum(farm_rig.jobs_done_by(w.name) for w in workers) == 220
    for batch_id, total in ((batch.id, 200), (late["batch"].id, 20)):
        versions = farm_rig.versions(batch_id)
        assert len(versions) == 2 * total
        # A job rendered twice around the restart (kombu hands back in-flight messages) is stored
        # at the same key with the same image.
        assert all(len(set(v)) == 1 for name, v in versions.items() if name.endswith(".png"))
    assert all(w.proc.poll() is None for w in workers)



def test_a_message_popped_just_as_redis_dies_goes_back_to_the_head_of_its_queue_when_redis_returns(tmp_path):
    """kombu BRPOPs a message and only then records it as unacked; Redis is killed in between."""
    from kombu import Connection, Consumer, Queue

    from worker import transport

    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        queue_name = "zfarm.test.popped"
        client = server.client()
        for index in (0, 1):  # LPUSH adds at the tail and BRPOP takes the head: job 0 is taken first
            client.lpush(queue_name, wire.render_message({"batch_id": "b-popped", "index": index},
                                                         f"popped-{index}", queue_name, 60.0))
        received: list[dict] = []

        def consume(connection, on_pop=None):
            if on_pop is not None:
                deliver = connection.transport._deliver
                connection.transport._deliver = lambda message, queue: (on_pop(), deliver(message, queue))[1]
            with Consumer(connection, [Queue(queue_name)], accept=["json"], prefetch_count=1,
                          callbacks=[lambda body, message: (received.append(body[1]["job"]), message.ack())]):
                connection.drain_events(timeout=5)

        with Connection(server.url, transport="worker.transport:Transport") as first:
            with pytest.raises(first.connection_errors):
                consume(first, on_pop=server.kill)
        assert received == []
        assert len(transport.popped_unrecorded()) == 1

        server.start()
        client = server.client()
        # The popped message is in neither its queue nor the unacked hash: only this process holds it.
        assert [wire.envelope_task_id(m) for m in client.lrange(queue_name, 0, -1)] == ["popped-1"]
        assert client.hlen(keys.KOMBU_UNACKED) == 0

        with Connection(server.url, transport="worker.transport:Transport") as second:
            consume(second)
        assert received == [{"batch_id": "b-popped", "index": 0}]
        assert transport.popped_unrecorded() == []
        # Delivered once and acked; the other job still waits.
        assert client.hlen(keys.KOMBU_UNACKED) == 0
        assert [wire.envelope_task_id(m) for m in client.lrange(queue_name, 0, -1)] == ["popped-1"]
    finally:
        server.kill()



def test_a_queue_added_while_brpop_blocks_on_the_holding_queue_is_polled_at_once_when_woken(redis_server):
    """What a worker does once loaded: add its job queues, then wake the BRPOP on its holding queue."""
    from kombu import Connection, Consumer, Queue

    client = redis.Redis.from_url(redis_server)
    client.lpush("zfarm.test.jobs", wire.render_message({"batch_id": "b-wake", "index": 0}, "wake-0",
                                                        "zfarm.test.jobs", 60.0))
    received: list[dict] = []
    with Connection(redis_server, transport="worker.transport:Transport") as connection:
        consumer = Consumer(connection, [Queue("zfarm.test.hold")], accept=["json"], prefetch_count=1,
                            callbacks=[lambda body, message: (received.append(body[1]["job"]), message.ack())])
        # Without the wake, the BRPOP would block this long on the holding queue alone (1 s by default).
        consumer.channel.brpop_timeout = 60
        consumer.consume()
        drained = threading.Thread(target=lambda: connection.drain_events(timeout=30), daemon=True)
        drained.start()
        wait_for(lambda: client.info("clients")["blocked_clients"] == 1, 10, what="the BRPOP to block")
        channel = consumer.channel
        consumer.add_queue(Queue("zfarm.test.jobs"))
        consumer.consume()
        assert channel.wake() is True
        drained.join(20)
        assert received == [{"batch_id": "b-wake", "index": 0}]
        assert channel.wake() is False  # nothing blocked now
    client.close()


def test_a_broker_that_refuses_client_commands_leaves_added_queues_to_the_next_brpop(redis_server):
    """An ACL without CLIENT: no wake-up, and the job is still taken once the BRPOP times out."""
    from kombu import Connection, Consumer, Queue

    client = redis.Redis.from_url(redis_server)
    client.acl_setuser("no-client", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                       commands=["+@all", "-client"])
    client.lpush("zfarm.test.jobs", wire.render_message({"batch_id": "b-acl", "index": 0}, "acl-0",
                                                        "zfarm.test.jobs", 60.0))
    received: list[dict] = []
    limited_url = redis_server.replace("redis://", "redis://no-client:pw@")
    with Connection(limited_url, transport="worker.transport:Transport") as connection:
        consumer = Consumer(connection, [Queue("zfarm.test.hold")], accept=["json"], prefetch_count=1,
                            callbacks=[lambda body, message: (received.append(body[1]["job"]), message.ack())])
        consumer.consume()
        drained = threading.Thread(target=lambda: connection.drain_events(timeout=30), daemon=True)
        drained.start()
        wait_for(lambda: client.info("clients")["blocked_clients"] == 1, 10, what="the BRPOP to block")
        consumer.add_queue(Queue("zfarm.test.jobs"))
        consumer.consume()
        assert consumer.channel.wake() is False
        drained.join(20)
        assert received == [{"batch_id": "b-acl", "index": 0}]
    # Asked once for the connection, not again before every BRPOP.
    assert client.info("commandstats")["cmdstat_client|id"]["rejected_calls"] == 1
    client.acl_deluser("no-client")
    client.close()


def test_a_job_whose_message_vanished_before_any_record_is_found_by_the_sweep_and_rendered(rig):
    farm_rig = rig()
    batch = farm_rig.farm().submit(specs(5, size_px=512))
    [queue] = [q for q in farm_rig.client.scan_iter("zfarm.*") if farm_rig.client.type(q) == b"list"]
    # What a worker, or a Redis, killed between BRPOP and kombu's unacked write leaves: no message.
    assert farm_rig.client.rpop(queue) is not None
    farm_rig.worker("finder")

    status = finished(batch, 60)
    assert counts(status) == (5, 5, 0, 0, 0, 0)
    assert_each_result_stored_once(farm_rig, batch.id, 5)
    assert "had no message in any queue" in farm_rig.workers[0].output()


# Storage outage

def test_a_20_s_storage_outage_mid_batch_holds_jobs_unacked_until_their_upload_lands(rig):
    farm_rig = rig()
    worker = farm_rig.worker("uploader", simulate_s=0.3, ZFARM_UPLOAD_RETRY_S=60)
    farm = farm_rig.farm()
    batch = farm.submit(specs(12))
    wait_for(lambda: batch.status()["done"] >= 3, 30, what="some jobs done before the outage")

    farm_rig.s3.stop()
    wait_for(lambda: "upload of" in worker.output() and "retry" in worker.output(), 30,
             what="an upload to fail and retry")
    in_flight = set(farm_rig.ledger.running_jobs(batch.id))
    done_during = batch.status()["done"]
    outage_ends = time.monotonic() + 20
    while time.monotonic() < outage_ends:
        status = batch.status()
        # Nothing is counted done, or acked, without its stored result.
        assert (status["done"], status["failed"], status["running"]) == (done_during, 0, 1)
        assert farm_rig.client.hlen(keys.KOMBU_UNACKED) == 1
        time.sleep(0.5)
    farm_rig.s3.start()
    status = finished(batch, 90)

    assert counts(status) == (12, 12, 0, 0, 0, 0)
    assert_each_result_stored_once(farm_rig, batch.id, 12, may_repeat=in_flight)
    assert farm_rig.client.hlen(keys.KOMBU_UNACKED) == 0


def test_an_upload_that_outlasts_its_retry_period_fails_the_job_and_retry_failed_completes_only_those(rig):
    farm_rig = rig()
    farm_rig.worker("uploader", simulate_s=0.3, ZFARM_UPLOAD_RETRY_S=1.5)
    farm = farm_rig.farm()
    batch = farm.submit(specs(10))
    wait_for(lambda: batch.status()["done"] >= 3, 30, what="some jobs done before the outage")
    farm_rig.s3.stop()
    wait_for(lambda: batch.status()["failed"] >= 2, 60, what="uploads to give up")
    farm_rig.s3.start()
    status = finished(batch, 60)
    done, failed = status["done"], status["failed"]
    assert done + failed == 10 and failed >= 2
    assert all(f["kind"] == "upload" and "gave up after" in f["message"] for f in status["failures"])
    failed_indexes = {f["index"] for f in status["failures"]}

    retried = zfarm_cli(farm_rig, "retry", batch.id, "--failed")
    assert retried.stdout.strip() == str(failed)
    status = finished(batch, 60)

    assert counts(status) == (10, 10, 0, 0, 0, 0)
    # Jobs done before the retry were not rendered again.
    assert_each_result_stored_once(farm_rig, batch.id, 10, may_repeat=failed_indexes)
    assert farm_rig.jobs_done_by("uploader") == 10
    assert all(farm_rig.attempts(batch.id, i) == 1 for i in failed_indexes)


# Resubmission

def zfarm_cli(farm_rig: Rig, *args, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, ZFARM_PROFILE_TABLE=str(TEST_TABLE), PYTHONPATH=str(REPO),
               ZFARM_REDIS_URL=farm_rig.redis.url, ZFARM_STORAGE_URL=farm_rig.storage_url,
               **s3_env(farm_rig.s3))
    proc = subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"zfarm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("option", ["--idempotency-key", "--name"])
def test_submitting_a_file_again_with_the_same_idempotency_key_or_name_queues_nothing_twice(rig, option, tmp_path):
    farm_rig = rig()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a prompt number {i}\n" for i in range(5)))
    first = zfarm_cli(farm_rig, "submit", str(prompts), option, "nightly-2024.06")
    again = zfarm_cli(farm_rig, "submit", str(prompts), option, "nightly-2024.06")

    batch_id = first.stdout.strip()
    assert again.stdout.strip() == batch_id and "already submitted" in again.stderr
    assert sum(farm_rig.client.llen(q) for q in farm_rig.client.keys("zfarm.*.*.*")) == 5
    assert farm_rig.client.zcard(keys.BATCHES) == 1

    farm_rig.worker("only", simulate_s=FAST_S)
    status = finished(farm_rig.farm().batch(batch_id))
    assert counts(status) == (5, 5, 0, 0, 0, 0)
    assert farm_rig.jobs_done_by("only") == 5


# Duplicate delivery and a result written twice

def test_a_job_delivered_three_times_is_stored_and_counted_once(rig):
    farm_rig = rig()
    batch = farm_rig.farm().submit(specs(1))
    queue = next(q for q in farm_rig.client.keys("zfarm.*") if farm_rig.client.llen(q))
    message = farm_rig.client.lindex(queue, 0)
    farm_rig.client.rpush(queue, message, message)  # as a visibility-timeout restore would leave it
    for name in ("one", "two"):
        farm_rig.worker(name, simulate_s=FAST_S)
    wait_for(lambda: sum(farm_rig.client.llen(q) for q in farm_rig.client.keys("zfarm.*")) == 0
             and farm_rig.client.hlen(keys.KOMBU_UNACKED) == 0, 30, what="every copy to be taken and acked")

    assert counts(finished(batch)) == (1, 1, 0, 0, 0, 0)
    assert farm_rig.jobs_done_by("one") + farm_rig.jobs_done_by("two") == 1
    assert_each_result_stored_once(farm_rig, batch.id, 1)


def test_a_job_whose_worker_dies_between_storing_and_recording_is_stored_again_at_the_same_key_with_the_same_image(
        rig):
    farm_rig = rig()
    doomed = farm_rig.worker("doomed", simulate_s=2.0)
    farm = farm_rig.farm()
    batch = farm.submit(specs(1))
    claimed_by(farm_rig, batch.id, "doomed")
    farm_rig.worker("rescuer", simulate_s=FAST_S)
    # Writes to Redis wait while paused: the worker stores its result, then blocks recording it.
    admin = redis.Redis.from_url(farm_rig.redis.url)
    admin.execute_command("CLIENT", "PAUSE", 15000, "WRITE")
    try:
        wait_for(lambda: f"{batch.id}/000000.json" in farm_rig.versions(batch.id), 20,
                 what="the result to be stored")
        doomed.kill_group()
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
    status = finished(batch, RECOVERY_LIMIT_S)

    assert counts(status) == (1, 1, 0, 0, 0, 0)
    assert farm_rig.attempts(batch.id, 0) == 2
    versions = farm_rig.versions(batch.id)
    assert sorted(versions) == [f"{batch.id}/000000.json", f"{batch.id}/000000.png"]
    pngs, sidecars = versions[f"{batch.id}/000000.png"], versions[f"{batch.id}/000000.json"]
    assert len(pngs) == 2 and pngs[0] == pngs[1]
    described = [json.loads(s) for s in sidecars]
    assert sorted(d["worker"] for d in described) == [full_name("doomed"), full_name("rescuer")]
    volatile = {"worker", "render_s", "finished_at", "host", "versions"}
    assert [{k: v for k, v in d.items() if k not in volatile} for d in described][0] == \
        [{k: v for k, v in d.items() if k not in volatile} for d in described][1]
    assert farm_rig.jobs_done_by("rescuer") == 1 and farm_rig.jobs_done_by("doomed") == 0


# Junk in the queues

def _envelope(job, queue: str, task_id: str, **headers) -> dict:
    envelope = json.loads(wire.render_message({}, task_id, queue, 60))
    envelope["body"] = _b64([[], {"job": job}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    envelope["headers"].update(headers)
    return envelope


def _b64(obj) -> str:
    return base64.b64encode(json.dumps(obj, allow_nan=True).encode()).decode()


_DROP = object()  # in malformed_messages' job(): remove this field


def malformed_messages(batch_id: str, good_job: dict, queue: str, n: int, seed: int = 5):
    """`n` malformed queue items, each with the index of the real job it names (or None).

    Items naming a real job name each job once, so every item leaves exactly one record: a failure
    of its job, or an entry in the rejected list."""
    rng = random.Random(seed)
    nan, inf = float("nan"), float("inf")

    def job(index, /, **changes):
        out = json.loads(json.dumps(good_job))
        out["index"] = index
        for path, value in changes.items():
            target = out
            parts = path.split("__")
            for part in parts[:-1]:
                target = target[part]
            if value is _DROP:
                target.pop(parts[-1], None)
            else:
                target[parts[-1]] = value
        return out

    def wrapped(job_obj, task_id, **headers):
        return json.dumps(_envelope(job_obj, queue, task_id, **headers), allow_nan=True).encode()

    def own(i):
        """A task id the farm gives job i's own messages: submitted, retried, or queued again when lost."""
        return [job_id(batch_id, i), f"{job_id(batch_id, i)}-r1", f"{job_id(batch_id, i)}-lost-0badc0de"][i % 3]

    # Makers of items that are the real job `i`'s own message (its task id), made invalid: invalid job
    # content, or an invalid envelope around a readable body.
    naming = [
        lambda i: wrapped(job(i, version=2), own(i)),
        lambda i: wrapped(job(i, version="1"), own(i)),
        lambda i: wrapped(job(i, version=_DROP), own(i)),
        lambda i: wrapped(job(i, extra_field=1), own(i)),
        lambda i: wrapped(job(i, spec__style="noir"), own(i)),
        lambda i: wrapped(job(i, spec=_DROP), own(i)),
        lambda i: wrapped(job(i, spec__prompt=_DROP), own(i)),
        lambda i: wrapped(job(i, spec__prompt=""), own(i)),
        lambda i: wrapped(job(i, spec__prompt=12345), own(i)),
        lambda i: wrapped(job(i, spec__width="wide"), own(i)),
        lambda i: wrapped(job(i, spec__width=1000), own(i)),
        lambda i: wrapped(job(i, spec__height=4096), own(i)),
        lambda i: wrapped(job(i, spec__steps=[8]), own(i)),
        lambda i: wrapped(job(i, spec__steps=0), own(i)),
        lambda i: wrapped(job(i, spec__guidance=nan), own(i)),
        lambda i: wrapped(job(i, spec__guidance=inf), own(i)),
        lambda i: wrapped(job(i, spec__width=-inf), own(i)),
        lambda i: wrapped(job(i, spec__seed=nan), own(i)),
        lambda i: wrapped(job(i, spec__seed=-1), own(i)),
        lambda i: wrapped(job(i, spec__negative_prompt=["no"]), own(i)),
        lambda i: wrapped(job(i, spec__prompt="x" * rng.randint(2001, 60_000)), own(i)),
        lambda i: wrapped(job(i, spec__prompt="x" * rng.randint(70_000, 400_000)), own(i)),
        lambda i: wrapped(job(i, spec__prompt="nul\x00byte"), own(i)),
        lambda i: wrapped(job(i, priority="urgent"), own(i)),
        lambda i: wrapped(job(i, tier="../../etc"), own(i)),
        lambda i: wrapped(job(i, submitted_at=nan), own(i)),
        lambda i: wrapped(job(i, submitted_at="yesterday"), own(i)),
        lambda i: wrapped(job(i, spec="a red fox"), own(i)),
        lambda i: wrapped(job(i), own(i), task="celery.backend_cleanup"),
        lambda i: wrapped(job(i), own(i), timelimit=[nan, None]),
        lambda i: wrapped(job(i), own(i), timelimit="60"),
        lambda i: wrapped(job(i), own(i), eta="2030-01-01T00:00:00"),
        lambda i: wrapped(job(i), own(i), task=["zfarm.render"]),
        lambda i: json.dumps({**_envelope(job(i), queue, own(i)),
                              "body": _b64([[], {"job": job(i)}, {"callbacks": [{"task": "celery.ping"}]}])}).encode(),
        lambda i: json.dumps({**_envelope(job(i), queue, own(i)),
                              "body": _b64([[1, 2], {"job": job(i)}, None])}).encode(),
        lambda i: json.dumps({**_envelope(job(i), queue, own(i)),
                              "body": _b64([[], {"job": job(i), "self": 1}, None])}).encode(),
        lambda i: json.dumps({**_envelope(job(i), queue, own(i)), "content-type": "application/x-yaml"}).encode(),
        lambda i: json.dumps({**_envelope(job(i), queue, own(i)),
                              "properties": {**_envelope(job(i), queue, "x")["properties"], "delivery_tag": [i]}}).encode(),
    ]
    # Makers of items that name no real job.
    traversal = ["../../etc", "..", "a/../b", "/etc/passwd", "..\\windows", "batch/../../x", "~root", "a" * 65]
    not_naming = [
        # Invalid, and naming a real job (the last, which no item above names) under another task id:
        # rejected, and the job is left alone for its own message.
        lambda: wrapped(job(n - 1, spec__width=1000), "foreign"),
        lambda: wrapped(job(n - 1), own(n - 1), id={"not": "a string"}),
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))),
        lambda: b"",
        lambda: b"{\"body\": ",
        lambda: rng.choice([b"null", b"42", b"\"a string\"", b"[1, 2, 3]", b"true", b"NaN", b"Infinity"]),
        lambda: b"1" * 5000,
        lambda: json.dumps({"body": "x", "properties": {}}).encode(),
        lambda: json.dumps({k: v for k, v in _envelope(good_job, queue, "np").items() if k != "properties"}).encode(),
        lambda: json.dumps({**_envelope(good_job, queue, "b64"), "body": "%%% not base64 %%%"}).encode(),
        lambda: json.dumps({**_envelope(good_job, queue, "bj"), "body": base64.b64encode(b"{not json").decode()}).encode(),
        lambda: json.dumps({**_envelope(good_job, queue, "pk"), "content-type": "application/x-python-serialize",
                            "body": base64.b64encode(b"\x80\x04\x95junk-pickle.").decode()}).encode(),
        lambda: wrapped(job(0, batch_id=rng.choice(traversal)), "trav"),
        lambda: wrapped(job(0, batch_id=rng.choice([123, None, [], {"id": batch_id}, True])), "btype"),
        lambda: wrapped(job(0, batch_id="no-such-batch"), "nobatch"),
        lambda: wrapped(job(rng.choice([-1, 1.5, nan, inf, True, None, 10**12, [1], {"i": 1}])), "idx"),
        lambda: wrapped(job(10**6), "range"),
        lambda: wrapped(job(0, index=_DROP), "noidx"),
        lambda: wrapped(job(0, batch_id=_DROP), "nobid"),
        lambda: wrapped(rng.choice(["a job", 7, None, [good_job], True]), "jobtype"),
        lambda: json.dumps({**_envelope(good_job, queue, "nojob"), "body": _b64([[], {}, None])}).encode(),
        lambda: wrapped(job(0, batch_id="x" * 100_000), "bighuge"),
    ]
    # Costly to push: once each.
    rare = [b"[" * 100_000 + b"]" * 100_000, b"x" * (5 * 1024 * 1024)]
    naming_share = len(naming) / (len(naming) + len(not_naming))
    items, next_index = [(raw, None) for raw in rare], 0
    for k in range(n - len(rare)):
        if rng.random() < naming_share:
            maker = naming[k % len(naming)] if k < 2 * len(naming) else rng.choice(naming)
            items.append((maker(next_index), next_index))
            next_index += 1
        else:
            maker = not_naming[k % len(not_naming)] if k < 2 * len(not_naming) else rng.choice(not_naming)
            items.append((maker(), None))
    return items



def test_a_thousand_malformed_messages_are_each_failed_or_rejected_and_the_worker_renders_on(rig):
    farm_rig = rig()
    farm = farm_rig.farm()
    # A real batch whose jobs the malformed messages name; its own messages are taken out of the queue.
    batch = farm.submit([{"prompt": "a real job", "seed": 1}] * 1000)
    queue = next(q.decode() for q in farm_rig.client.keys("zfarm.*") if farm_rig.client.llen(q))
    good_job = json.loads(farm_rig.client.hget(keys.batch_jobs(batch.id), 0))
    farm_rig.client.delete(queue)

    items = malformed_messages(batch.id, good_job, queue, 1000)
    named = sum(1 for _, index in items if index is not None)
    assert len(items) == 1000 and 300 < named < 900
    # The jobs no malformed message names are cancelled once the messages are through, so the batch ends.
    unnamed = 1000 - named
    pipe = farm_rig.client.pipeline()
    for raw, _ in items:
        pipe.lpush(queue, raw)
    pipe.execute()
    # The jobs no item names have no message at all, which the lost-message sweep would queue again after
    # two registry TTLs: a TTL longer than this test keeps it out, however slowly a loaded machine goes.
    worker = farm_rig.worker("sturdy", simulate_s=FAST_S, ZFARM_REGISTRY_TTL_S="150")
    wait_for(lambda: farm_rig.client.llen(queue) == 0 and farm_rig.client.hlen(keys.KOMBU_UNACKED) == 0, 180,
             interval_s=0.5, what="every malformed message to be taken")
    wait_for(lambda: batch.status()["failed"] + farm_rig.client.llen(keys.REJECTED) >= 1000, 30,
             what="every malformed message to be recorded")
    cancelled = farm.batch(batch.id).cancel()

    status = batch.status()
    assert cancelled == unnamed
    assert counts(status) == (1000, 0, named, unnamed, 0, 0)
    assert sorted(f["index"] for f in status["failures"]) == list(range(named))
    assert all(f["kind"] == "invalid" and f["message"] for f in status["failures"])
    rejected = [json.loads(r) for r in farm_rig.client.lrange(keys.REJECTED, 0, -1)]
    assert len(rejected) == 1000 - named and all(r["reason"] for r in rejected)
    # Junk naming job 999 under another task id was rejected, and job 999 left to its own message.
    assert any(r.get("task_id") == "foreign" and "multiple of 16" in r["reason"] for r in rejected)
    assert 999 not in {f["index"] for f in status["failures"]}

    after = farm.submit([{"prompt": "a good job after the junk", "seed": 2, "width": 256, "height": 256}])
    assert counts(finished(after)) == (1, 1, 0, 0, 0, 0)
    assert worker.proc.poll() is None and "Unrecoverable error" not in worker.output()
