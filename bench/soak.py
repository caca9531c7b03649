"""Churn soak: a fleet of 64+ simulated workers that come and go while faults happen together.

    python bench/soak.py                                   # 10 minutes, 64 workers (24x 12 GB, 24x 24 GB, 16x 80 GB)
    python bench/soak.py --duration-s 900 --json bench/results/soak.json
    python bench/soak.py --short                           # the CI version: 6 workers, about 40 s

Everything is real: a private redis-server (AOF, fsync always), moto's S3 server with a versioned
bucket, and every worker a `python -m worker --vram-gb N --simulate S` process. Each class's S is
its seconds per 1024x1024 8-step image in the measured table (bench/results/profile_table.json),
times one scale factor chosen so the whole fleet's ideal throughput is --target-jobs-per-s: the box
has 2 cores, and the per-job overhead (Celery, PNG, two S3 PUTs, the ledger) must stay well under
them for the simulation to be faithful (the fleet's CPU share is printed).

The run, bounded in time and in count:
1. The fleet starts; once every worker is ready, --idle-s seconds with no job: the Redis commands,
   CPU and network of an idle fleet, per idle worker-second.
2. For --duration-s seconds, --producers threads each submit batches (10-200 jobs of mixed sizes;
   priorities high 20%, normal 60%, low 20%) whenever the backlog falls under --backlog-s seconds of
   the fleet's work, so it never runs dry. Meanwhile churn, at random moments: workers join, are
   killed with SIGKILL (their process group: the OOM killer, a dead VM), or get SIGTERM (a spot
   notice: the job in progress finishes within the grace period or is handed back); replacements
   join, so the fleet stays between --workers and --workers + --spare. Once, at 40% of the time,
   Redis is killed -9 and restarted from its AOF --redis-down-s later; once, at 70%, S3 is down for
   --storage-outage-s.
3. Producers stop; the soak waits until every batch is final (at most --drain-s).

Printed:
- jobs submitted / stored exactly once / stored more than once (identical bytes or not) / lost
  (not final, or done without its PNG and sidecar) / failed;
- submit-to-stored p50 and p99, overall and by priority (low waits behind everything: no ageing);
- fleet efficiency: the reference images of work stored during step 2, over the work the capacity
  alive at each moment could have done (each worker's rate from the moment it is ready until it is
  killed or signalled), overall and outside the Redis and storage outages;
- Redis commands, CPU and network per job (step 2, net of this soak's own monitoring commands) and
  per idle worker-second (step 1), by command.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

for _name, _value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                      "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_name, _value)  # moto takes any credentials; boto3 wants some

from farm import RedisServer, S3Server, WorkerProcess, base_env, s3_env, wait_for, workers_blocked_on_job_queues  # noqa: E402  (tests/farm.py)
from shared import keys, profiles, registry, routing  # noqa: E402

MEASURED_TABLE = REPO / "bench" / "results" / "profile_table.json"
# (width, height, share of jobs) at 8 steps, over every size tier of the measured table.
SIZE_MIX = ((512, 512, 0.25), (768, 768, 0.2), (1024, 1024, 0.25), (1024, 768, 0.1), (1280, 1280, 0.08),
            (1536, 1536, 0.08), (2048, 2048, 0.04))
PRIORITY_MIX = (("high", 0.2), ("normal", 0.6), ("low", 0.2))
IGNORED_COMMANDS = ("info", "client", "config", "slowlog", "latency")


@dataclass
class SoakWorker:
    vram_class: int
    s_per_image: float
    name: str
    proc: WorkerProcess
    started_at: float
    ready_at: float | None = None
    gone_at: float | None = None
    how_gone: str = ""

    @property
    def rate(self) -> float:
        """Reference images (1024x1024, 8 steps) per second."""
        return 1.0 / self.s_per_image


class CountingConnection(redis.Connection):
    """Counts the commands this soak's own monitoring sends, so they can be taken off Redis's counts."""
    counts: dict[str, int] = {}
    lock = threading.Lock()

    @staticmethod
    def _count(args) -> None:
        words = (args[0].decode() if isinstance(args[0], bytes) else str(args[0])).lower().split() if args else ["?"]
        if len(words) == 1 and words[0] in ("script", "client", "config", "command") and len(args) > 1:
            words.append(str(args[1]).lower())
        name = "|".join(words[:2])
        with CountingConnection.lock:
            CountingConnection.counts[name] = CountingConnection.counts.get(name, 0) + 1

    def send_command(self, *args, **kwargs):
        self._count(args)
        return super().send_command(*args, **kwargs)

    def pack_commands(self, commands):
        for command in commands:
            self._count(command)
        return super().pack_commands(commands)


class RedisMeter:
    """Redis's command counts, CPU and network, summed across restarts (a restart resets them)."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self.lock = threading.Lock()
        self.total = {"commands": {}, "usec": {}, "cpu_s": 0.0, "net_in": 0, "net_out": 0}
        self.last = None  # (run_id, sample)
        self.stop = threading.Event()

    def sample(self) -> dict:
        info = self.client.info("everything")
        commands = {k.removeprefix("cmdstat_"): v for k, v in info.items() if k.startswith("cmdstat_")}
        return {"run_id": info["run_id"], "calls": {k: v["calls"] for k, v in commands.items()},
                "usec": {k: v["usec"] for k, v in commands.items()},
                "cpu_s": info["used_cpu_sys"] + info["used_cpu_user"],
                "net_in": info["total_net_input_bytes"], "net_out": info["total_net_output_bytes"]}

    def tick(self) -> None:
        try:
            now = self.sample()
        except redis.RedisError:
            return  # Redis is down: the next sample of the new process starts a new segment
        with self.lock:
            if self.last is not None and self.last["run_id"] == now["run_id"]:
                prev = self.last
            else:
                prev = {"calls": {}, "usec": {}, "cpu_s": 0.0, "net_in": 0, "net_out": 0}
            for name, calls in now["calls"].items():
                self.total["commands"][name] = self.total["commands"].get(name, 0) + calls - prev["calls"].get(name, 0)
                self.total["usec"][name] = self.total["usec"].get(name, 0) + now["usec"][name] - prev["usec"].get(name, 0)
            self.total["cpu_s"] += now["cpu_s"] - prev["cpu_s"]
            self.total["net_in"] += now["net_in"] - prev["net_in"]
            self.total["net_out"] += now["net_out"] - prev["net_out"]
            self.last = now

    def snapshot(self) -> dict:
        self.tick()
        with self.lock, CountingConnection.lock:
            return {"commands": dict(self.total["commands"]), "usec": dict(self.total["usec"]),
                    "cpu_s": self.total["cpu_s"], "net_in": self.total["net_in"], "net_out": self.total["net_out"],
                    "ours": dict(CountingConnection.counts), "at": time.time()}

    def run(self, every_s: float) -> None:
        while not self.stop.wait(every_s):
            self.tick()


def usage(before: dict, after: dict) -> dict:
    """Redis's work between two snapshots, less this soak's own commands (and INFO-like ones)."""
    commands = {}
    for name, calls in after["commands"].items():
        n = calls - before["commands"].get(name, 0) - (after["ours"].get(name, 0) - before["ours"].get(name, 0))
        if n > 0 and not name.startswith(IGNORED_COMMANDS):
            commands[name] = n
    return {"commands": commands, "cpu_s": after["cpu_s"] - before["cpu_s"],
            "net_bytes": (after["net_in"] - before["net_in"]) + (after["net_out"] - before["net_out"]),
            "seconds": after["at"] - before["at"]}


def parse_fleet(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        vram_class, _, count = part.partition("x")
        out += [int(vram_class)] * int(count or 1)
    return out


def pick(rng: random.Random, mix):
    """One value of a ((value..., share), ...) mix, drawn by share: the value, or a tuple of them."""
    values = [m[:-1] for m in mix]
    value = rng.choices(values, weights=[m[-1] for m in mix])[0]
    return value[0] if len(value) == 1 else value


class Soak:
    def __init__(self, args, tmp: Path):
        self.args = args
        self.tmp = tmp
        self.rng = random.Random(args.seed)
        self.table_path = MEASURED_TABLE
        self.table = profiles.load_table(self.table_path)
        self.redis = RedisServer(tmp / "redis", appendonly=True).start()
        self.s3 = S3Server().start()
        self.bucket = f"soak-{uuid.uuid4().hex[:8]}"
        s3 = self.s3.client()
        s3.create_bucket(Bucket=self.bucket)
        s3.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})
        self.storage_url = f"s3://{self.bucket}/results"
        self.monitor = redis.Redis(connection_pool=redis.ConnectionPool.from_url(
            self.redis.url, connection_class=CountingConnection))
        self.meter = RedisMeter(redis.Redis.from_url(self.redis.url))
        fleet = parse_fleet(args.fleet)
        self.classes = sorted(set(fleet))
        self.initial_fleet = fleet
        choice = {c: profiles.choose(self.table, c, args.ram_gb) for c in self.classes}
        self.max_pixels = {c: choice[c].max_pixels for c in self.classes}
        mean_units = sum(share * routing.work_units(w * h, 8) for w, h, share in SIZE_MIX)
        unscaled_units_per_s = sum(1 / choice[c].s_per_image for c in fleet)
        self.scale = unscaled_units_per_s / (args.target_jobs_per_s * mean_units)
        self.s_per_image = {c: choice[c].s_per_image * self.scale for c in self.classes}
        self.mean_units = mean_units
        self.workers: list[SoakWorker] = []
        self.batches: list[dict] = []
        self.batches_lock = threading.Lock()
        self.events: list[dict] = []
        self.outages: list[tuple[str, float, float]] = []
        self.stop_producing = threading.Event()
        self.stop_churn = threading.Event()
        self.counter = 0
        self.backlog = 0      # jobs queued or running, as last read
        self.submitting = 0   # jobs of submits in progress
        self.errors: list[str] = []

    # Workers
    def env(self) -> dict:
        return base_env(self.redis.url, self.storage_url, ZFARM_PROFILE_TABLE=str(self.table_path),
                        ZFARM_RAM_GB=str(self.args.ram_gb), ZFARM_HEARTBEAT_S=str(self.args.heartbeat_s),
                        ZFARM_REGISTRY_TTL_S=str(self.args.ttl_s), ZFARM_SHUTDOWN_GRACE_S=str(self.args.grace_s),
                        ZFARM_UPLOAD_RETRY_S="120", **s3_env(self.s3))

    def start_worker(self, vram_class: int) -> SoakWorker:
        self.counter += 1
        name = f"soak-{vram_class}g-{self.counter}@farm"
        s = self.s_per_image[vram_class]
        proc = WorkerProcess(self.env(), ["--vram-gb", str(vram_class), "--simulate", f"{s:.4f}", "--name", name,
                                          "--loglevel", "WARNING"], self.tmp / f"worker-{self.counter}.log").start()
        worker = SoakWorker(vram_class, s, name, proc, time.time())
        self.workers.append(worker)
        return worker

    def alive(self) -> list[SoakWorker]:
        return [w for w in self.workers if w.gone_at is None]

    def note_ready(self) -> None:
        waiting = [w for w in self.workers if w.ready_at is None and w.gone_at is None]
        if not waiting:
            return
        try:
            ready = {w["name"] for w in registry.live_workers(self.monitor) if w.get("state") == "ready"}
        except redis.RedisError:
            return
        now = time.time()
        for w in waiting:
            if w.name in ready:
                w.ready_at = now
            elif w.proc.proc.poll() is not None:
                w.gone_at, w.how_gone = now, f"exited {w.proc.proc.returncode} before ready"
                self.errors.append(f"{w.name} exited {w.proc.proc.returncode} before it was ready")

    # Producers
    def refresh_backlog(self) -> None:
        """The producers' view of the backlog, read once a second for all of them."""
        try:
            jobs = self.backlog_jobs()
        except redis.RedisError:
            return
        with self.batches_lock:
            self.backlog = jobs

    def backlog_jobs(self) -> int:
        with self.batches_lock:
            ids = [b["id"] for b in self.batches if not b.get("final")]
        if not ids:
            return 0
        with self.monitor.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hmget(keys.batch_counts(batch_id), "queued", "running")
            replies = pipe.execute()
        final = []
        total = 0
        for batch_id, (queued, running) in zip(ids, replies):
            q, r = int(queued or 0), int(running or 0)
            total += q + r
            if q + r == 0:
                final.append(batch_id)
        with self.batches_lock:
            for b in self.batches:
                if b["id"] in final and b.get("seen_empty"):
                    b["final"] = True
                elif b["id"] in final:
                    b["seen_empty"] = True
        return total

    def producer(self, n: int) -> None:
        from producer.api import Farm

        # Batches are drawn from their own generator, so timing (how often the backlog was full)
        # does not change what is submitted.
        wait_rng, rng = random.Random(self.args.seed * 1000 + n), random.Random(self.args.seed * 1000 + 500 + n)
        farm = Farm.from_env(table=self.table, redis_url=self.redis.url, storage_url=self.storage_url,
                             s3_endpoint_url=self.s3.endpoint_url, redis_retry_s=120)
        low_water = self.args.backlog_s * self.args.target_jobs_per_s
        while not self.stop_producing.wait(wait_rng.uniform(0.5, 2.0)):
            with self.batches_lock:
                if self.backlog + self.submitting >= low_water:
                    continue
                size = rng.randint(self.args.min_batch, self.args.max_batch)
                self.submitting += size
            priority = pick(rng, PRIORITY_MIX)
            jobs = []
            for i in range(size):
                w, h = pick(rng, SIZE_MIX)
                jobs.append({"prompt": f"soak p{n} job {i} {rng.random():.6f}", "seed": rng.randrange(2 ** 31),
                             "width": w, "height": h, "steps": 8})
            try:
                batch = farm.submit(jobs, priority=priority, allow_pending=True)
            except Exception as exc:  # noted and counted: a producer that gives up is a finding
                self.errors.append(f"producer {n}: submit failed: {type(exc).__name__}: {exc}")
                continue
            finally:
                with self.batches_lock:
                    self.submitting -= size
            with self.batches_lock:
                self.batches.append({"id": batch.id, "jobs": size, "priority": priority, "producer": n,
                                     "submitted_at": time.time()})
                self.backlog += size

    # Churn
    def churn(self, t_end: float) -> None:
        a = self.args
        redis_at = time.time() + 0.4 * a.duration_s
        storage_at = time.time() + 0.7 * a.duration_s
        done_redis = done_storage = False
        # One of each kind early on for certain (a short run may draw none), random ones after.
        forced = {"kill": time.time() + 0.1 * a.duration_s, "sigterm": time.time() + 0.2 * a.duration_s,
                  "join": time.time() + 0.3 * a.duration_s}
        pending_joins: list[tuple[float, int]] = []
        last_backlog = 0.0
        while not self.stop_churn.wait(0.5):
            now = time.time()
            self.note_ready()
            if now - last_backlog >= 1.0:
                last_backlog = now
                self.refresh_backlog()
            for when, vram_class in list(pending_joins):
                if when <= now:
                    pending_joins.remove((when, vram_class))
                    w = self.start_worker(vram_class)
                    self.event("join", w, f"replacement {vram_class} GB")
            if now >= t_end:
                return
            if not done_redis and now >= redis_at:
                done_redis = True
                self.redis_restart()
                continue
            if not done_storage and now >= storage_at:
                done_storage = True
                self.storage_outage()
                continue
            due = [k for k, when in forced.items() if when <= now]
            if due:
                kind = due[0]
                del forced[kind]
            elif self.rng.random() < 0.5 / a.churn_every_s:
                kind = self.rng.choice(["kill", "sigterm", "join"])
            else:
                continue
            ready = [w for w in self.alive() if w.ready_at is not None]
            size = len(self.alive()) + len(pending_joins)
            if kind == "join" and size < a.workers + a.spare:
                w = self.start_worker(self.rng.choice(self.initial_fleet))
                self.event("join", w, "extra")
            elif kind in ("kill", "sigterm") and ready and len(ready) > a.workers // 2:
                victim = self.rng.choice(ready)
                victim.gone_at = time.time()
                if kind == "kill":
                    victim.proc.kill_group()
                    victim.how_gone = "SIGKILL"
                else:
                    victim.proc.signal(signal.SIGTERM)
                    victim.how_gone = "SIGTERM"
                self.event(kind, victim, "")
                if size - 1 < a.workers + self.rng.randint(0, a.spare):
                    pending_joins.append((time.time() + self.rng.uniform(1, 10), self.rng.choice(self.initial_fleet)))

    def event(self, kind: str, worker: SoakWorker | None, note: str) -> None:
        self.events.append({"at": time.time(), "kind": kind, "worker": worker.name if worker else "", "note": note})

    def redis_restart(self) -> None:
        t0 = time.time()
        self.redis.kill()
        self.event("redis-kill", None, "SIGKILL")
        time.sleep(self.args.redis_down_s)  # an outage of a set length, not a wait for a condition
        self.redis.start()
        self.outages.append(("redis", t0, time.time()))
        self.event("redis-back", None, f"down {time.time() - t0:.1f} s")

    def storage_outage(self) -> None:
        t0 = time.time()
        self.s3.stop()
        self.event("s3-down", None, "")
        time.sleep(self.args.storage_outage_s)  # an outage of a set length
        self.s3.start()
        self.outages.append(("storage", t0, time.time()))
        self.event("s3-back", None, f"down {time.time() - t0:.1f} s")

    # The run
    def run(self) -> dict:
        a = self.args
        meter_thread = threading.Thread(target=self.meter.run, args=(2.0,), daemon=True)
        meter_thread.start()
        for vram_class in self.initial_fleet:
            self.start_worker(vram_class)

        def all_ready():
            self.note_ready()
            if self.errors:
                raise RuntimeError("; ".join(self.errors))
            return all(w.ready_at for w in self.workers)

        wait_for(all_ready, 300, interval_s=1.0, what="the fleet to be ready")
        # Ready in the registry comes a moment before a worker has declared its 48 queues and blocks
        # on them: the idle phase starts once every one does.
        wait_for(lambda: workers_blocked_on_job_queues(self.monitor) >= len(self.workers), 120, interval_s=1.0,
                 what="every worker to block on its job queues")
        fleet_ready_s = time.time() - min(w.started_at for w in self.workers)
        # Step 1: the idle fleet (every worker blocked on its queues, heartbeating, sweeping).
        idle_before = self.meter.snapshot()
        time.sleep(a.idle_s)  # a measurement period: nothing to wait for
        idle = usage(idle_before, self.meter.snapshot())
        idle_workers = len(self.alive())

        # Step 2: work and churn.
        cpu_before = psutil.cpu_times()
        t0 = time.time()
        work_before = self.meter.snapshot()
        producers = [threading.Thread(target=self.producer, args=(n,), daemon=True) for n in range(a.producers)]
        for p in producers:
            p.start()
        self.churn(t0 + a.duration_s)
        self.stop_producing.set()
        for p in producers:
            p.join(180)
        t1 = time.time()
        work_after = self.meter.snapshot()
        cpu_after = psutil.cpu_times()
        busy = usage(work_before, work_after)

        # Step 3: drain.
        def drained():
            self.note_ready()
            try:
                return self.backlog_jobs() == 0 and all(b.get("final") for b in self.batches)
            except redis.RedisError:
                return False

        drained_ok = True
        try:
            wait_for(drained, a.drain_s, interval_s=1.0, what="every batch to finish")
        except TimeoutError as exc:
            drained_ok = False
            self.errors.append(str(exc))
        t2 = time.time()
        self.meter.stop.set()
        return self.report(t0, t1, t2, idle, idle_workers, busy, fleet_ready_s, drained_ok, cpu_before, cpu_after)

    def close(self) -> None:
        for w in self.workers:
            if w.proc.proc.poll() is None:
                w.proc.kill_group()
            w.proc.stop()
        self.s3.stop()
        self.redis.stop()

    # What happened
    def stored(self) -> dict[str, list[tuple[str, float]]]:
        """Every stored version of every result object: {name: [(ETag, last modified), ...]}, one listing."""
        s3 = self.s3.client()
        out: dict[str, list[tuple[str, float]]] = {}
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix="results/"):
            for version in page.get("Versions", []):
                out.setdefault(version["Key"][len("results/"):], []).append(
                    (version["ETag"], version["LastModified"].timestamp()))
        return out

    def report(self, t0, t1, t2, idle, idle_workers, busy, fleet_ready_s, drained_ok, cpu_before, cpu_after) -> dict:
        from shared.ledger import Ledger

        ledger = Ledger(self.monitor)
        s3 = self.s3.client()
        totals = {"submitted": 0, "stored_once": 0, "stored_twice_same": 0, "stored_twice_differing": 0,
                  "lost": 0, "failed": 0, "done": 0}
        # Per stored job: (submitted at, stored at, priority, work units). S3 gives whole seconds, which
        # is enough to place a job in or out of a window of minutes; latency comes from the sidecars'
        # own finished_at (milliseconds), read for a sample of --latency-sample jobs.
        finished: list[tuple[float, float, str, float]] = []
        sample: list[tuple[str, float, str]] = []
        versions = self.stored()
        for b in self.batches:
            status = ledger.status(b["id"])
            totals["submitted"] += status["total"]
            totals["done"] += status["done"]
            totals["failed"] += status["failed"]
            states = ledger.states(b["id"])
            jobs = ledger.jobs(b["id"])
            for i in range(status["total"]):
                png, side = versions.get(f"{b['id']}/{i:06d}.png"), versions.get(f"{b['id']}/{i:06d}.json")
                if states.get(i) == "failed":
                    continue
                if states.get(i) != "done" or not png or not side:
                    totals["lost"] += 1  # never final, or done without its PNG and sidecar
                    continue
                if len(png) == 1:
                    totals["stored_once"] += 1
                elif len({etag for etag, _ in png}) == 1:
                    totals["stored_twice_same"] += 1
                else:
                    totals["stored_twice_differing"] += 1
                spec = jobs[i]["spec"]
                finished.append((status["created_at"], max(t for _, t in side), b["priority"],
                                 routing.work_units(spec["width"] * spec["height"], spec["steps"])))
                sample.append((f"{b['id']}/{i:06d}.json", status["created_at"], b["priority"]))
        rng = random.Random(self.args.seed)
        sample = rng.sample(sample, min(len(sample), self.args.latency_sample))

        def latency_of(item):
            key, created_at, priority = item
            body = s3.get_object(Bucket=self.bucket, Key=f"results/{key}")["Body"].read()
            return priority, json.loads(body)["finished_at"] - created_at

        with ThreadPoolExecutor(4) as pool:
            sampled = list(pool.map(latency_of, sample))
        latency = sorted(lat for _p, lat in sampled)
        by_priority = {}
        for priority, _share in PRIORITY_MIX:
            mine = sorted(lat for p, lat in sampled if p == priority)
            if mine:
                by_priority[priority] = {"jobs": len(mine), "p50_s": round(percentile(mine, 0.5), 2),
                                         "p99_s": round(percentile(mine, 0.99), 2)}
        # Efficiency: work stored in [t0, t1] over what the live capacity could have done then.
        def capacity_units(start, end):
            total = 0.0
            for w in self.workers:
                if w.ready_at is None:
                    continue
                a, b = max(start, w.ready_at), min(end, w.gone_at or end)
                if b > a:
                    total += (b - a) * w.rate
            return total

        def work_done(start, end):
            return sum(u for _s, f, _p, u in finished if start <= f < end)

        windows = [(t0, t1)]
        for _kind, a, b in sorted(self.outages, key=lambda o: o[1]):
            # Outside an outage and the minute after it (the fleet catching up on held jobs would
            # otherwise count as work the outage's capacity did).
            cut_end = b + 60
            windows = [piece for (s, e) in windows for piece in ((s, min(e, a)), (max(s, cut_end), e)) if piece[1] > piece[0]]
        ideal_all = capacity_units(t0, t1)
        done_all = work_done(t0, t1)
        ideal_calm = sum(capacity_units(s, e) for s, e in windows)
        done_calm = sum(work_done(s, e) for s, e in windows)
        jobs_in_window = sum(1 for _s, f, _p, _u in finished if t0 <= f < t1)
        worker_seconds_idle = idle["seconds"] * idle_workers
        cpu = [sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("user", "system", "nice"))]
        busy_total = sum(busy["commands"].values())
        out = {
            "fleet": self.args.fleet, "workers_at_start": len(self.initial_fleet),
            "workers_started": len(self.workers), "scale": round(self.scale, 3),
            "s_per_image_scaled": {c: round(s, 3) for c, s in self.s_per_image.items()},
            "max_pixels": self.max_pixels, "target_jobs_per_s": self.args.target_jobs_per_s,
            "duration_s": round(t1 - t0, 1), "drain_s": round(t2 - t1, 1), "drained": drained_ok,
            "fleet_ready_s": round(fleet_ready_s, 1),
            "batches": len(self.batches), **totals,
            "events": {k: sum(1 for e in self.events if e["kind"] == k)
                       for k in ("join", "kill", "sigterm", "redis-kill", "s3-down")},
            "outages": [{"what": k, "s": round(b - a, 1)} for k, a, b in self.outages],
            "submit_to_stored_s": {"sampled_jobs": len(latency),
                                   "p50": round(percentile(latency, 0.5), 2) if latency else None,
                                   "p99": round(percentile(latency, 0.99), 2) if latency else None,
                                   "by_priority": by_priority},
            "efficiency": round(done_all / ideal_all, 4) if ideal_all else None,
            "efficiency_outside_outages": round(done_calm / ideal_calm, 4) if ideal_calm else None,
            "work_units_done_in_window": round(done_all, 1), "jobs_done_in_window": jobs_in_window,
            "jobs_per_s_in_window": round(jobs_in_window / (t1 - t0), 2),
            "workers_alive_mean": round(capacity_seconds_mean(self.workers, t0, t1), 1),
            "redis_per_job": {
                "commands": round(busy_total / max(1, jobs_in_window), 1),
                "cpu_ms": round(1000 * busy["cpu_s"] / max(1, jobs_in_window), 3),
                "net_bytes": round(busy["net_bytes"] / max(1, jobs_in_window)),
                "by_command": {k: round(v / max(1, jobs_in_window), 2)
                               for k, v in sorted(busy["commands"].items(), key=lambda kv: -kv[1])
                               if v / max(1, jobs_in_window) >= 0.05}},
            "redis_per_idle_worker_s": {
                "workers": idle_workers, "seconds": round(idle["seconds"], 1),
                "commands": round(sum(idle["commands"].values()) / worker_seconds_idle, 3),
                "cpu_ms": round(1000 * idle["cpu_s"] / worker_seconds_idle, 4),
                "net_bytes": round(idle["net_bytes"] / worker_seconds_idle),
                "by_command": {k: round(v / worker_seconds_idle, 3)
                               for k, v in sorted(idle["commands"].items(), key=lambda kv: -kv[1])
                               if v / worker_seconds_idle >= 0.005}},
            "redis_cpu_share_in_window": round(busy["cpu_s"] / (t1 - t0), 3),
            "machine_cpu_share_in_window": round(cpu[0] / (t1 - t0) / os.cpu_count(), 3),
            "cpus": os.cpu_count(), "errors": self.errors[:20],
        }
        return out


def capacity_seconds_mean(workers, t0, t1) -> float:
    total = 0.0
    for w in workers:
        if w.ready_at is None:
            continue
        a, b = max(t0, w.ready_at), min(t1, w.gone_at or t1)
        if b > a:
            total += b - a
    return total / (t1 - t0)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def print_summary(s: dict) -> None:
    out = sys.stdout
    print(f"fleet {s['fleet']}: {s['workers_at_start']} workers at start, {s['workers_started']} started in all, "
          f"{s['workers_alive_mean']} alive on average; speeds x{s['scale']} of the measured table "
          f"{s['s_per_image_scaled']} s/img; ready in {s['fleet_ready_s']} s", file=out)
    ev = s["events"]
    print(f"{s['duration_s']} s of churn: {ev['join']} joins, {ev['kill']} kill -9, {ev['sigterm']} SIGTERM, "
          f"outages {s['outages']}; drained in {s['drain_s']} s", file=out)
    rows = [("jobs submitted", s["submitted"]), ("stored exactly once", s["stored_once"]),
            ("stored again, identical bytes", s["stored_twice_same"]),
            ("stored again, differing bytes", s["stored_twice_differing"]), ("lost", s["lost"]),
            ("failed", s["failed"]),
            (f"submit-to-stored p50 / p99 ({s['submit_to_stored_s']['sampled_jobs']} jobs sampled)",
             f"{s['submit_to_stored_s']['p50']} / {s['submit_to_stored_s']['p99']} s"),
            *[(f"  {p} ({v['jobs']} jobs) p50 / p99", f"{v['p50_s']} / {v['p99_s']} s")
              for p, v in s["submit_to_stored_s"]["by_priority"].items()],
            ("fleet efficiency (all / outside outages)", f"{s['efficiency']} / {s['efficiency_outside_outages']}"),
            ("jobs per second during churn", s["jobs_per_s_in_window"]),
            ("Redis commands / CPU / network per job",
             f"{s['redis_per_job']['commands']} / {s['redis_per_job']['cpu_ms']} ms / {s['redis_per_job']['net_bytes']} B"),
            ("Redis commands / CPU / network per idle worker-second",
             f"{s['redis_per_idle_worker_s']['commands']} / {s['redis_per_idle_worker_s']['cpu_ms']} ms / "
             f"{s['redis_per_idle_worker_s']['net_bytes']} B"),
            ("Redis CPU share / machine CPU share during churn",
             f"{s['redis_cpu_share_in_window']} / {s['machine_cpu_share_in_window']}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=out)
    print("per job: " + ", ".join(f"{k} {v}" for k, v in s["redis_per_job"]["by_command"].items()), file=out)
    print("per idle worker-second: " + ", ".join(f"{k} {v}" for k, v in s["redis_per_idle_worker_s"]["by_command"].items()),
          file=out)
    if s["errors"]:
        print(f"errors: {s['errors']}", file=out)


SHORT = {"fleet": "12x2,24x2,80x2", "workers": 6, "spare": 1, "duration_s": 24, "idle_s": 3, "churn_every_s": 4,
         "redis_down_s": 2, "storage_outage_s": 4, "drain_s": 60, "target_jobs_per_s": 12, "producers": 2,
         "min_batch": 5, "max_batch": 30, "backlog_s": 4, "heartbeat_s": 1, "ttl_s": 4, "grace_s": 5}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default="12x24,24x24,80x16", help="classes and counts at start")
    ap.add_argument("--workers", type=int, default=64, help="the fleet never drops below this by churn's replacements")
    ap.add_argument("--spare", type=int, default=8, help="extra workers churn may add above --workers")
    ap.add_argument("--duration-s", type=float, default=600.0)
    ap.add_argument("--idle-s", type=float, default=30.0)
    ap.add_argument("--drain-s", type=float, default=600.0)
    ap.add_argument("--churn-every-s", type=float, default=10.0, help="mean seconds between churn events")
    ap.add_argument("--redis-down-s", type=float, default=5.0)
    ap.add_argument("--storage-outage-s", type=float, default=20.0)
    ap.add_argument("--target-jobs-per-s", type=float, default=20.0, help="the fleet's ideal throughput; sets the speed scale")
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--min-batch", type=int, default=10)
    ap.add_argument("--max-batch", type=int, default=200)
    ap.add_argument("--backlog-s", type=float, default=20.0, help="producers keep this many seconds of work queued")
    ap.add_argument("--heartbeat-s", type=float, default=5.0)
    ap.add_argument("--ttl-s", type=float, default=15.0)
    ap.add_argument("--grace-s", type=float, default=20.0)
    ap.add_argument("--ram-gb", type=float, default=64.0, help="host RAM the workers plan for (the profile choice)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--latency-sample", type=int, default=2000, help="jobs whose sidecar is read for the latency figures")
    ap.add_argument("--short", action="store_true", help="the CI version (overrides the sizes above)")
    ap.add_argument("--json", help="also write the summary to this file")
    args = ap.parse_args(argv)
    if args.short:
        for k, v in SHORT.items():
            setattr(args, k, v)
    return args


def main(argv=None) -> int:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="zfarm-soak-"))
    soak = Soak(args, tmp)
    ok_run = False
    try:
        summary = soak.run()
        ok_run = True
    finally:
        soak.close()
        if ok_run:
            shutil.rmtree(tmp, ignore_errors=True)  # kept, with the worker logs, when the run broke
    summary["events_log"] = soak.events
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    ok = (summary["lost"] == 0 and summary["stored_twice_differing"] == 0 and summary["failed"] == 0
          and summary["drained"] and not summary["errors"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
