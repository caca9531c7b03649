"""Queue overhead: zfarm's submit-to-result-stored round trip beside a bare Celery task's, same Redis.

    python bench/queue_overhead.py                  # 4 rounds of 100 jobs per system, alternating
    python bench/queue_overhead.py --jobs 50 --rounds 2 --json

zfarm: one single-job batch at a time, from `Farm.submit` until the ledger records the job done (the
worker does so after the PNG and its sidecar are stored), on `python -m worker --simulate 0` (the
simulated renderer sleeping 0 s). Bare: `noop.apply_async()` of a task that does nothing, until its
result is stored in the Redis result backend (`date_done`), on a plain Celery worker started from
this file (`--bare-worker NAME URL`): "bare" with Celery's defaults, and "bare-reliable" with the
delivery settings zfarm's worker uses. All workers: prefork, one process, the same redis-server;
rounds alternate so all see the same machine, and each job meets an idle worker (a pause after
each). Latency is taken to the worker's own timestamp of the stored result ("stored") and to the
moment this client saw it ("seen": BLPOP on the ledger's finished-batch list, or the result
backend's pub/sub).

Also printed: Redis commands per job (INFO commandstats deltas, commands run inside Lua scripts
included, less the idle background of the workers measured first; the bench's own waiting
commands shown apart), and a throughput figure (N jobs queued at once, time per job until all are
stored). Target: zfarm's median <= 2x bare's.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from celery import Celery

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from farm import RedisServer, WorkerProcess, base_env, wait_for  # noqa: E402  (tests/farm.py)

TARGET_RATIO = 2.0
IDLE_SAMPLE_S = 5.0
# Bare Celery apps, each on its own queue and worker: "bare" with Celery's defaults (JSON, Redis broker
# and result backend), and "bare-reliable" with the delivery settings zfarm's worker runs with
# (worker/app.py: acks late, requeue on a lost worker, prefetch 1, a time limit, task events), so the
# report can tell what those settings cost from what zfarm's own per-job work costs.
BARE_SETTINGS = {
    "bare": {},
    "bare-reliable": {"task_acks_late": True, "task_reject_on_worker_lost": True, "worker_prefetch_multiplier": 1,
                      "task_time_limit": 3600, "worker_send_task_events": True},
}


def bare_app(name: str, url: str | None = None):
    """(app, task) of one bare variant: a task that does nothing."""
    app = Celery(name, broker=url, backend=url)
    app.conf.update(task_default_queue=name, worker_concurrency=1, broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False, **BARE_SETTINGS[name])

    @app.task(name=f"{name}.noop")
    def noop():
        return None

    return app, noop


def run_bare_worker(name: str, url: str) -> None:
    app, _ = bare_app(name, url)
    app.worker_main(["worker", "--pool=prefork", "--concurrency=1", "-Q", name, "--without-mingle",
                     "--without-gossip", "--loglevel=WARNING", f"--hostname={name}@%h"])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def command_calls(client: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in client.info("commandstats").items()}


def delta(before: dict, after: dict) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}


class Zfarm:
    """Single-job batches through `Farm.submit`, waited for on the ledger's finished-batch list."""
    name = "zfarm"
    waiting_commands = ("blpop",)

    def __init__(self, url: str, storage_url: str):
        from producer.api import Farm

        self.farm = Farm.from_env(redis_url=url, storage_url=storage_url)
        self.waiter = redis.Redis.from_url(url)
        self.client = redis.Redis.from_url(url)

    def one(self, i: int) -> tuple[str, float, float]:
        from shared import keys

        t0 = time.time()
        batch = self.farm.submit([{"prompt": f"overhead {i}", "width": 512, "height": 512, "steps": 1}])
        popped = self.waiter.blpop([keys.FINISHED_EVENTS], timeout=30)
        if popped is None or popped[1].decode() != batch.id:
            raise SystemExit(f"batch {batch.id} did not finish (got {popped})")
        return batch.id, t0, time.time()

    def stored_at(self, ref: str) -> float:
        from shared import keys

        status = self.client.hmget(keys.batch_meta(ref), "finished_at")
        counts = self.client.hget(keys.batch_counts(ref), "done")
        if counts != b"1":
            raise SystemExit(f"batch {ref} is not done: {counts}")
        return float(status[0])

    def burst(self, n: int) -> float:
        t0 = time.time()
        batch = self.farm.submit([{"prompt": f"burst {i}", "width": 512, "height": 512, "steps": 1}
                                  for i in range(n)])
        status = batch.wait(timeout_s=600)
        if status["done"] != n:
            raise SystemExit(f"burst batch: {status['done']} of {n} done")
        # The batch's own record of its last job, not the polling moment.
        return float(status["finished_at"]) - t0


class Bare:
    """`noop.apply_async()`, waited for with `AsyncResult.get()` (the backend's pub/sub)."""
    waiting_commands = ("subscribe", "unsubscribe")

    def __init__(self, name: str, url: str):
        self.name = name
        self.app, self.task = bare_app(name, url)
        self.results = {}

    def one(self, i: int) -> tuple[str, float, float]:
        t0 = time.time()
        result = self.task.apply_async()
        result.get(timeout=30)
        self.results[result.id] = result
        return result.id, t0, time.time()

    def stored_at(self, ref: str) -> float:
        return _epoch(self.results.pop(ref).date_done)

    def burst(self, n: int) -> float:
        t0 = time.time()
        results = [self.task.apply_async() for _ in range(n)]
        for result in results:
            result.get(timeout=600)
        return max(_epoch(r.date_done) for r in results) - t0


def _epoch(done: datetime.datetime) -> float:
    if done.tzinfo is None:
        done = done.replace(tzinfo=datetime.timezone.utc)
    return done.timestamp()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=100, help="jobs per system per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--gap-ms", type=float, default=20.0, help="pause between one job's result and the next submit")
    ap.add_argument("--burst", type=int, default=200, help="jobs queued at once for the throughput figure")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    ap.add_argument("--bare-worker", nargs=2, metavar=("NAME", "URL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_worker:
        run_bare_worker(*args.bare_worker)
        return 0

    with tempfile.TemporaryDirectory(prefix="zfarm-overhead-") as tmp:
        tmp = Path(tmp)
        server = RedisServer(tmp / "redis").start()
        storage_url = f"file://{tmp / 'results'}"
        # Production cadence for heartbeats and sweeps, not the tests' one-second one.
        env = base_env(server.url, storage_url, ZFARM_HEARTBEAT_S="5", ZFARM_REGISTRY_TTL_S="15")
        env.pop("ZFARM_PROFILE_TABLE", None)
        ours = WorkerProcess(env, ["--simulate", "0", "--name", "bench-ours", "--loglevel", "WARNING"],
                             tmp / "ours.log").start()
        theirs = [BareWorkerProcess(env, ["--bare-worker", name, server.url], tmp / f"{name}.log").start()
                  for name in BARE_SETTINGS]
        client = server.client()
        try:
            summary = measure(args, server.url, storage_url, client)
        finally:
            for worker in [ours, *theirs]:
                worker.stop()
            server.stop()
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["ratio_median"] <= TARGET_RATIO else 1


class BareWorkerProcess(WorkerProcess):
    """This file run as the bare Celery worker (`--bare-worker URL`)."""

    def start(self) -> "BareWorkerProcess":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, __file__, *self.args], env=self.env, cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self


def measure(args, url: str, storage_url: str, client: redis.Redis) -> dict:
    from shared import registry

    ours = wait_for(lambda: [w for w in registry.live_workers(client) if w.get("state") == "ready"], 60,
                    what="the zfarm worker to be ready")[0]
    systems = [Zfarm(url, storage_url), *(Bare(name, url) for name in BARE_SETTINGS)]
    for system in systems:  # warm up: imports, connections, the first PNG encode
        for i in range(5):
            system.stored_at(system.one(i)[0])

    idle_before = command_calls(client)
    time.sleep(IDLE_SAMPLE_S)
    idle = delta(idle_before, command_calls(client))
    idle_per_s = {k: v / IDLE_SAMPLE_S for k, v in idle.items() if not k.startswith(("info", "client"))}

    latencies = {s.name: {"stored": [], "seen": []} for s in systems}
    commands = {s.name: {} for s in systems}
    durations = {s.name: 0.0 for s in systems}
    for _round in range(args.rounds):
        for system in systems:
            before = command_calls(client)
            started = time.monotonic()
            refs = []
            for i in range(args.jobs):
                refs.append(system.one(i))
                # Each job meets an idle worker: what the worker does after storing a result
                # (stats, ack, events) must not delay the next job's measurement.
                time.sleep(args.gap_ms / 1000)
            durations[system.name] += time.monotonic() - started  # idle background is subtracted over it
            used = delta(before, command_calls(client))
            for k, v in used.items():
                commands[system.name][k] = commands[system.name].get(k, 0) + v
            for ref, t0, seen in refs:
                latencies[system.name]["stored"].append(system.stored_at(ref) - t0)
                latencies[system.name]["seen"].append(seen - t0)

    n = args.jobs * args.rounds
    summary = {"jobs_per_system": n, "cpus": os.cpu_count(), "zfarm_tiers": ours.get("tiers"),
               "redis": client.info("server")["redis_version"], "versions": _versions()}
    for system in systems:
        lat = latencies[system.name]
        background = {k: v * durations[system.name] for k, v in idle_per_s.items()}
        net = {k: v - background.get(k, 0) for k, v in commands[system.name].items()
               if not k.startswith(("info", "client"))}
        waiting = sum(net.get(k, 0) for k in system.waiting_commands)
        summary[system.name] = {
            "stored_median_ms": round(1000 * statistics.median(lat["stored"]), 2),
            "stored_p99_ms": round(1000 * percentile(lat["stored"], 0.99), 2),
            "seen_median_ms": round(1000 * statistics.median(lat["seen"]), 2),
            "seen_p99_ms": round(1000 * percentile(lat["seen"], 0.99), 2),
            "commands_per_job": round((sum(net.values()) - waiting) / n, 1),
            "waiting_commands_per_job": round(waiting / n, 1),
            "by_command": {k: round(v / n, 2) for k, v in sorted(net.items(), key=lambda kv: -kv[1])
                           if round(v / n, 2) > 0.05},
        }
    for system in systems:
        system.burst(10)  # warm the burst path
        summary[system.name]["burst_ms_per_job"] = round(1000 * system.burst(args.burst) / args.burst, 2)
    summary["idle_commands_per_s"] = {k: round(v, 2) for k, v in idle_per_s.items()}
    for base in BARE_SETTINGS:
        summary[f"ratio_median_vs_{base}"] = round(summary["zfarm"]["stored_median_ms"]
                                                   / summary[base]["stored_median_ms"], 2)
        summary[f"ratio_p99_vs_{base}"] = round(summary["zfarm"]["stored_p99_ms"] / summary[base]["stored_p99_ms"], 2)
    summary["ratio_median"] = summary["ratio_median_vs_bare"]
    summary["target_ratio"] = TARGET_RATIO
    _print(summary)
    return summary


def _versions() -> dict:
    import importlib.metadata as md

    return {d: md.version(d) for d in ("celery", "kombu", "redis")}


def _print(s: dict) -> None:
    out = sys.stderr
    names = ["zfarm", *BARE_SETTINGS]
    print(f"{s['jobs_per_system']} jobs per system, one at a time; {s['cpus']} CPUs, redis-server {s['redis']}, "
          f"celery {s['versions']['celery']}, kombu {s['versions']['kombu']}, redis-py {s['versions']['redis']}",
          file=out)
    print(f"{'':14}{'stored median':>15}{'p99':>9}{'seen median':>13}{'p99':>9}{'cmds/job':>10}{'burst/job':>11}",
          file=out)
    for name in names:
        r = s[name]
        print(f"{name:14}{r['stored_median_ms']:>12.2f} ms{r['stored_p99_ms']:>6.2f} ms{r['seen_median_ms']:>10.2f} ms"
              f"{r['seen_p99_ms']:>6.2f} ms{r['commands_per_job']:>10.1f}{r['burst_ms_per_job']:>8.2f} ms", file=out)
    for base in BARE_SETTINGS:
        print(f"zfarm / {base}: median {s[f'ratio_median_vs_{base}']}, p99 {s[f'ratio_p99_vs_{base}']}"
              + (f" (target <= {s['target_ratio']})" if base == "bare" else ""), file=out)
    for name in names:
        parts = ", ".join(f"{k} {v}" for k, v in s[name]["by_command"].items())
        print(f"{name} Redis commands per job (net of idle background; waiting: "
              f"{s[name]['waiting_commands_per_job']}): {parts}", file=out)


if __name__ == "__main__":
    sys.exit(main())
