"""Redis high availability through Sentinel: the primary is killed mid-batch, Sentinel promotes the
replica, and workers, producers, their sweeps and Flower carry on without a restart.

Real processes: Debian's redis-server as primary and replica (AOF, a password) and three sentinels
(`redis-server FILE --sentinel`, quorum 2), moto's S3 server with a versioned bucket (every write of a
result is counted), `python -m worker --simulate S` subprocesses and Flower, all given the Sentinel
form of ZFARM_REDIS_URL. `bench/failover.py` runs the same scenario and writes its figures.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
import redis

from farm import REPO, S3Server, SentinelGroup, WorkerProcess, base_env, free_port, s3_env, wait_for
from farm_fixtures import TEST_TABLE
from shared import keys, profiles, registry
from shared.errors import RedisUrlError
from shared.ledger import Ledger
from shared.redis_conn import broker_url, connect, parse_sentinel_url, redact, sentinel_transport_options

WORKERS = 4
SIMULATE_S = 0.4          # a 512x512 8-step job renders in 0.1 s
FIRST_BATCH, SECOND_BATCH = 240, 40
KILL_AFTER_DONE = 40
FLOWER_USER, FLOWER_PASSWORD = "admin", "flower-sentinel-test"


class SentinelRig:
    """A farm on a Sentinel-managed Redis: primary, replica, three sentinels, S3, workers."""

    def __init__(self, tmp_path, down_after_ms: int = 1000):
        self.tmp_path = tmp_path
        self.group = SentinelGroup(tmp_path / "redis", down_after_ms=down_after_ms).start()
        self.s3 = S3Server().start()
        self.bucket = f"sentinel-{uuid.uuid4().hex[:10]}"
        s3 = self.s3.client()
        s3.create_bucket(Bucket=self.bucket)
        s3.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})
        self.storage_url = f"s3://{self.bucket}/results"
        self.client = connect(self.group.url, master_name=self.group.master_name)
        self.ledger = Ledger(self.client)
        self.workers: list[WorkerProcess] = []
        self.flower_proc = None

    def env(self, **extra) -> dict:
        return base_env(self.group.url, self.storage_url, ZFARM_REDIS_MASTER_NAME=self.group.master_name,
                        ZFARM_PROFILE_TABLE=str(TEST_TABLE), **s3_env(self.s3), **extra)

    def start_workers(self, n: int, simulate_s: float) -> list[WorkerProcess]:
        started = []
        for i in range(n):
            name = f"ha-{i}@farm"
            proc = WorkerProcess(self.env(ZFARM_WORKER_NAME=name), ["--simulate", str(simulate_s)],
                                 self.tmp_path / f"worker-{i}.log").start()
            proc.name = name
            started.append(proc)
        self.workers += started

        def ready():
            for proc in started:
                if proc.proc.poll() is not None:
                    raise RuntimeError(f"worker exited {proc.proc.returncode}:\n{proc.output()[-3000:]}")
            live = {w["name"]: w for w in registry.live_workers(self.client) if w.get("state") == "ready"}
            return all(p.name in live for p in started) and live

        live = wait_for(ready, 90, interval_s=0.2, what="every worker to be ready")
        for proc in started:
            proc.instance = live[proc.name]["instance"]
        return started

    def farm(self):
        from producer.api import Farm

        return Farm.from_env(table=profiles.load_table(TEST_TABLE), redis_url=self.group.url,
                             redis_master_name=self.group.master_name, storage_url=self.storage_url,
                             s3_endpoint_url=self.s3.endpoint_url)

    def start_flower(self) -> str:
        port = free_port()
        self.flower_log = open(self.tmp_path / "flower.log", "wb")
        self.flower_proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.flower_app", "flower", f"--port={port}",
             "--address=127.0.0.1", f"--basic-auth={FLOWER_USER}:{FLOWER_PASSWORD}"],
            env=self.env(), cwd=REPO, stdout=self.flower_log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"

        def up():
            if self.flower_proc.poll() is not None:
                raise RuntimeError((self.tmp_path / "flower.log").read_text())
            try:
                return flower_get(url, "/healthcheck", auth=False) is not None
            except (urllib.error.URLError, OSError):
                return False

        wait_for(up, 60, interval_s=0.2, what="Flower to answer")
        return url

    def stored_versions(self, batch_id: str) -> dict[str, list[str]]:
        """Every stored version of every result object of a batch, by ETag (the MD5 of its bytes)."""
        s3 = self.s3.client()
        out: dict[str, list[str]] = {}
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=self.bucket,
                                                                       Prefix=f"results/{batch_id}/"):
            for version in page.get("Versions", []):
                out.setdefault(version["Key"][len("results/"):], []).append(version["ETag"])
        return out

    def close(self, failed: bool) -> None:
        for proc in self.workers:
            proc.kill_group()
            proc.stop()
        if self.flower_proc is not None:
            self.flower_proc.kill()
            self.flower_proc.wait(10)
            self.flower_log.close()
        if failed:
            for proc in self.workers:
                print(f"--- {proc.log_path.name} ---\n{proc.output()[-4000:]}")
        self.s3.stop()
        self.group.stop()


def flower_get(url: str, path: str, auth: bool = True):
    request = urllib.request.Request(url + path)
    if auth:
        token = base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body


def specs(n: int, tag: str) -> list[dict]:
    return [{"prompt": f"{tag} {i}", "seed": 7000 + i, "width": 512, "height": 512} for i in range(n)]


def finished_at_times(rig: SentinelRig, batch_id: str) -> list[float]:
    """When each stored result's sidecar says its job finished: the workers' own clocks."""
    s3 = rig.s3.client()
    out = []
    for index in range(rig.ledger.status(batch_id)["total"]):
        body = s3.get_object(Bucket=rig.bucket, Key=f"results/{batch_id}/{index:06d}.json")["Body"].read()
        out.append(json.loads(body)["finished_at"])
    return out


def failover(rig: SentinelRig, workers: int = WORKERS, first: int = FIRST_BATCH, second: int = SECOND_BATCH,
             kill_after_done: int = KILL_AFTER_DONE, simulate_s: float = SIMULATE_S, flower: bool = True) -> dict:
    """Kill -9 the primary mid-batch while a producer submits another batch; returns the figures."""
    started = rig.start_workers(workers, simulate_s)
    flower_url = rig.start_flower() if flower else None
    farm = rig.farm()
    batch = farm.submit(specs(first, "before the failover"))
    if flower_url:
        lengths = wait_for(lambda: flower_get(flower_url, "/api/queues/length")["active_queues"], 30,
                           what="Flower to list the queues through Sentinel")
        flower_before = sum(q["messages"] for q in lengths)
    wait_for(lambda: rig.ledger.status(batch.id)["done"] >= kill_after_done, 60, interval_s=0.02,
             what=f"{kill_after_done} jobs done before the kill")
    # The ledger's done count, sampled every 50 ms through Sentinel: when recorded progress stopped
    # and resumed (a sidecar's own time says when it was written, not when the job was recorded).
    progress: list[tuple[float, int]] = []
    sampling = threading.Event()

    def sample():
        watcher = Ledger(connect(rig.group.url, master_name=rig.group.master_name))
        while not sampling.is_set():
            try:
                done = watcher.status(batch.id)["done"]
            except Exception:  # Redis away beyond the client's retries: the next sample tells
                done = None
            if done is not None and (not progress or done != progress[-1][1]):
                progress.append((time.time(), done))
            sampling.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    wait_for(lambda: progress, 10, what="a first sample of the ledger")
    old_port = rig.group.primary.port
    rig.group.primary.kill()
    killed_at = time.time()
    late: dict = {}

    def submit_during_failover():
        try:
            late["batch"] = rig.farm().submit(specs(second, "during the failover"))
            late["accepted_after_s"] = time.time() - killed_at
        except Exception as exc:  # the assertion below names it
            late["error"] = exc

    producer = threading.Thread(target=submit_during_failover)
    producer.start()
    wait_for(lambda: rig.group.current_primary_port() != old_port, 60, interval_s=0.05,
             what="Sentinel to promote the replica")
    promoted_after_s = time.time() - killed_at
    producer.join(90)
    assert "error" not in late, f"the producer gave up during the failover: {late.get('error')!r}"

    def all_final():
        statuses = [rig.ledger.status(b.id) for b in (batch, late["batch"])]
        return statuses if all(s["finished_at"] for s in statuses) else None

    statuses = wait_for(all_final, 120, interval_s=0.1, what="both batches to finish after the failover")
    sampling.set()
    sampler.join(10)
    if flower_url:
        # Queue lengths still come through Sentinel, now from the promoted replica.
        lengths = wait_for(lambda: flower_get(flower_url, "/api/queues/length")["active_queues"], 30,
                           what="Flower to list the queues after the failover")
        flower_after = sum(q["messages"] for q in lengths)

    figures = {"workers": workers, "jobs": first + second, "promoted_after_s": round(promoted_after_s, 2),
               "second_batch_accepted_after_s": round(late["accepted_after_s"], 2),
               "done": 0, "failed": 0, "lost": 0, "stored_twice": 0, "same_bytes": True}
    times = []
    for status, b in zip(statuses, (batch, late["batch"])):
        figures["done"] += status["done"]
        figures["failed"] += status["failed"]
        figures["lost"] += status["total"] - status["done"] - status["failed"] - status["cancelled"]
        versions = rig.stored_versions(b.id)
        figures["lost"] += sum(1 for i in range(status["total"])
                               if f"{b.id}/{i:06d}.png" not in versions or f"{b.id}/{i:06d}.json" not in versions)
        pngs = [v for k, v in versions.items() if k.endswith(".png")]
        figures["stored_twice"] += sum(1 for v in pngs if len(v) > 1)
        figures["same_bytes"] = figures["same_bytes"] and all(len(set(v)) == 1 for v in pngs)
        times += finished_at_times(rig, b.id)
    figures["counted_twice"] = max(0, sum(int(rig.client.hget(keys.worker_stats(p.name), "jobs_done") or 0)
                                          for p in started) - figures["done"])
    before = max(t for t, _ in progress if t < killed_at)
    after = min(t for t, _ in progress if t > killed_at)
    figures["seconds_without_progress"] = round(after - before, 2)
    figures["first_job_recorded_after_kill_s"] = round(after - killed_at, 2)
    figures["first_result_written_after_kill_s"] = round(min(t for t in times if t > killed_at) - killed_at, 2)
    live = {w["name"]: w for w in registry.live_workers(rig.client)}
    figures["workers_restarted"] = sum(1 for p in started if p.proc.poll() is not None
                                       or live.get(p.name, {}).get("instance") != p.instance)
    if flower_url:
        figures["flower_queue_messages_before_after"] = [flower_before, flower_after]
    return figures


@pytest.fixture
def sentinel_rig(tmp_path, monkeypatch, request):
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    rig = SentinelRig(tmp_path)
    yield rig
    report = getattr(request.node, "rep_call", None)
    rig.close(failed=report is None or report.failed)


def test_the_primary_killed_mid_batch_is_replaced_by_its_replica_and_no_job_is_lost_or_counted_twice(sentinel_rig):
    figures = failover(sentinel_rig)
    print(f"\nSentinel failover: {json.dumps(figures)}")

    assert figures["done"] == FIRST_BATCH + SECOND_BATCH and figures["failed"] == 0
    assert figures["lost"] == 0
    assert figures["counted_twice"] == 0
    # A job in flight at the kill may be rendered again (its finish or ack lost with the primary), to
    # the same key with the same bytes; nothing else is written twice.
    assert figures["same_bytes"] and figures["stored_twice"] <= WORKERS
    assert figures["workers_restarted"] == 0
    assert figures["seconds_without_progress"] < 20


def test_a_sentinel_url_names_every_sentinel_its_password_and_one_database_for_all():
    url = "sentinel://:pw@h1:26379;sentinel://:pw@h2:26380;sentinel://:pw@h3/2"

    target = parse_sentinel_url(url)

    assert target.sentinels == (("h1", 26379), ("h2", 26380), ("h3", 26379))
    assert (target.password, target.db) == ("pw", 2)
    # Celery gets one sentinel (kombu's move to the next URL of a list would drop the worker's transport)
    # and the list in its transport options.
    assert broker_url(url) == "sentinel://:pw@h1:26379/2"
    options = sentinel_transport_options(url, "zfarm")
    assert options["master_name"] == "zfarm" and options["sentinel_kwargs"]["password"] == "pw"
    assert options["sentinels"] == [["h1", 26379], ["h2", 26380], ["h3", 26379]]
    assert "pw" not in redact(url) and redact(url).count("***") == 3
    assert broker_url("redis://:pw@h:6379/0") == "redis://:pw@h:6379/0"


@pytest.mark.parametrize("url", ["sentinel://", "sentinel://h1:26379;redis://h2:6379",
                                 "sentinel://h1:26379/1;sentinel://h2:26379/2", "sentinel://h1:port"])
def test_a_sentinel_url_that_cannot_be_read_is_refused_with_the_reason(url):
    with pytest.raises(RedisUrlError):
        parse_sentinel_url(url)


def test_a_command_cut_off_by_the_primary_s_death_follows_the_promotion_instead_of_retrying_the_dead_address(
        tmp_path):
    """redis-py's command retry reconnects the same connection object to the address it first resolved;
    zfarm's Sentinel connections ask the sentinels again on every reconnect, so a command in flight at a
    failover lands on the promoted replica within seconds, not after the whole retry period."""
    group = SentinelGroup(tmp_path / "redis", down_after_ms=1000).start()
    try:
        retry_s, blocked_s = 40, 3
        client = connect(group.url, retry_s=retry_s, master_name=group.master_name)
        client.ping()
        outcome: dict = {}

        def blocked_pop():   # in flight on the primary when it dies
            try:
                outcome["reply"] = client.blpop(["nothing-comes"], timeout=blocked_s)
            except Exception as exc:  # the assertion below names it
                outcome["error"] = exc
            outcome["done_at"] = time.monotonic()

        popper = threading.Thread(target=blocked_pop)
        popper.start()
        wait_for(lambda: any(c.get("cmd") == "blpop" for c in redis.Redis(port=group.primary.port,
                 password=group.password).client_list()), 10, what="the BLPOP to reach the primary")
        old_port = group.primary.port
        group.primary.kill()
        killed_at = time.monotonic()
        popper.join(retry_s + 10)
        assert "error" not in outcome, f"the command gave up: {outcome.get('error')!r}"
        assert outcome["reply"] is None   # retried on the new primary, where it waited its own timeout
        took_s = outcome["done_at"] - killed_at
        assert group.current_primary_port() != old_port
        assert took_s < retry_s / 2, f"the command took {took_s:.1f} s: it retried the dead primary"
    finally:
        group.stop()
