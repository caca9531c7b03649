"""Capacity model: what one Redis primary costs per job and per worker, and the largest fleet it carries.

    python bench/capacity.py                                    # measure (about 2 minutes), print the model
    python bench/capacity.py --json bench/results/capacity.json
    python bench/capacity.py --from bench/results/capacity.json --soak bench/results/soak.json   # model + check only

Measured on a private redis-server (AOF, fsync always, as the soak) with real `python -m worker
--simulate S` processes and file:// storage (Redis is what is measured here):

1. memory per queued job: 10 batches of 1,000 jobs (512x512..2048x2048) submitted with no worker
   running; Redis's used_memory before and after, per job.
2. an idle fleet of --idle-workers workers: used_memory, connected clients and the registry's own
   keys per worker, then --idle-s seconds with no job: Redis commands, CPU and network per idle
   worker-second.
3. throughput: --busy-workers workers at `--simulate 0` (each job costs only its overhead) take
   --jobs 512x512 jobs from one batch, as fast as they go (the issue's method): commands, CPU and
   network per job, net of the fleet's idle background over the same time.
4. the same with task events on (what Flower turns on) and one subscriber on the event channel:
   events and their bytes per job, and what they add to Redis's CPU per job.

From these the model derives, for each class's measured seconds per 1024x1024 8-step image, the
largest fleet one primary carries while its CPU stays under --redis-cpu-budget of one core (Redis
runs commands on one thread), with the other limits beside it: memory for a given backlog,
clients (maxclients), network, Flower's event rate and S3's PUT rate. With --soak it predicts the
soak's Redis CPU and commands from the soak's own jobs and worker-seconds and compares.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from farm import RedisServer, WorkerProcess, base_env, wait_for, workers_blocked_on_job_queues  # noqa: E402  (tests/farm.py)
from shared import keys, profiles, registry  # noqa: E402

MEASURED_TABLE = REPO / "bench" / "results" / "profile_table.json"
IGNORED = ("info", "client", "config", "memory", "psubscribe", "subscribe", "punsubscribe", "unsubscribe")
# The card each class stands for in the model's table.
CARDS = {80: "H100 80GB", 24: "RTX 4090 24GB", 12: "RTX 3060 12GB"}
QUEUE_MIX = ((512, 512), (768, 768), (1024, 1024), (1280, 1280), (1536, 1536), (2048, 2048))
REFERENCE_JOB = "1024x1024, 8 steps"


def stats(client: redis.Redis) -> dict:
    info = client.info("everything")
    return {"calls": {k.removeprefix("cmdstat_"): v["calls"] for k, v in info.items() if k.startswith("cmdstat_")},
            "cpu_s": info["used_cpu_sys"] + info["used_cpu_user"], "used_memory": info["used_memory"],
            "clients": info["connected_clients"], "net": info["total_net_input_bytes"] + info["total_net_output_bytes"],
            "at": time.time()}


def delta(a: dict, b: dict) -> dict:
    calls = {k: v - a["calls"].get(k, 0) for k, v in b["calls"].items()
             if v - a["calls"].get(k, 0) > 0 and not k.startswith(IGNORED)}
    return {"calls": calls, "commands": sum(calls.values()), "cpu_s": b["cpu_s"] - a["cpu_s"],
            "net": b["net"] - a["net"], "seconds": b["at"] - a["at"]}


def start_fleet(server: RedisServer, tmp: Path, n: int, simulate_s: float, tag: str, **env_extra) -> list[WorkerProcess]:
    env = base_env(server.url, f"file://{tmp / 'results'}", ZFARM_PROFILE_TABLE=str(MEASURED_TABLE), ZFARM_RAM_GB="64",
                   ZFARM_HEARTBEAT_S="5", ZFARM_REGISTRY_TTL_S="15", **env_extra)
    classes = [12, 24, 80]
    workers = [WorkerProcess(env, ["--vram-gb", str(classes[i % 3]), "--simulate", str(simulate_s), "--name",
                                   f"{tag}-{i}@farm", "--loglevel", "WARNING"], tmp / f"{tag}-{i}.log").start()
               for i in range(n)]
    client = server.client()
    wait_for(lambda: len([w for w in registry.live_workers(client)
                          if w.get("state") == "ready" and w["name"].startswith(tag)]) == n, 300, interval_s=0.5,
             what=f"{n} workers to be ready")
    return workers


def stop_fleet(workers) -> None:
    for w in workers:
        w.stop()


def measure(args) -> dict:
    from producer.api import Farm

    out: dict = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="zfarm-capacity-") as tmp:
        tmp = Path(tmp)
        server = RedisServer(tmp / "redis", appendonly=True).start()
        client = server.client()
        out["redis"] = client.info("server")["redis_version"]
        table = profiles.load_table(MEASURED_TABLE)
        storage_url = f"file://{tmp / 'results'}"
        farm = Farm.from_env(table=table, redis_url=server.url, storage_url=storage_url)
        try:
            # 1. Memory per queued job.
            before = stats(client)
            batch_ids = []
            for b in range(10):
                jobs = [{"prompt": f"a queued job, batch {b} number {i}: a lighthouse on a cliff at dusk",
                         "seed": i, "width": QUEUE_MIX[i % 6][0], "height": QUEUE_MIX[i % 6][1]} for i in range(1000)]
                batch_ids.append(farm.submit(jobs, allow_pending=True).id)
            after = stats(client)
            out["memory_per_queued_job_bytes"] = round((after["used_memory"] - before["used_memory"]) / 10_000)
            client.flushall()

            # 2. The idle fleet: what starting it cost, then what it costs idle.
            before = stats(client)
            idle = start_fleet(server, tmp, args.idle_workers, 1.0, "idle")
            wait_for(lambda: workers_blocked_on_job_queues(client) >= args.idle_workers, 120, interval_s=0.5,
                     what="every worker to block on its job queues")
            started = delta(before, stats(client))
            out["commands_per_worker_start"] = round(started["commands"] / args.idle_workers)
            time.sleep(5)  # let the first heartbeats and sweeps land before sampling memory
            settled = stats(client)
            registry_bytes = sum(client.memory_usage(k) or 0 for k in client.scan_iter(f"{keys.PREFIX}:worker:*"))
            out["memory_per_worker_bytes"] = round((settled["used_memory"] - before["used_memory"]) / args.idle_workers)
            out["registry_bytes_per_worker"] = round(registry_bytes / args.idle_workers)
            out["clients_per_worker"] = round((settled["clients"] - before["clients"]) / args.idle_workers, 2)
            a = stats(client)
            time.sleep(args.idle_s)  # a measurement period
            d = delta(a, stats(client))
            worker_s = d["seconds"] * args.idle_workers
            out["idle"] = {"workers": args.idle_workers, "seconds": round(d["seconds"], 1),
                           "commands_per_worker_s": round(d["commands"] / worker_s, 3),
                           "cpu_ms_per_worker_s": round(1000 * d["cpu_s"] / worker_s, 4),
                           "net_bytes_per_worker_s": round(d["net"] / worker_s),
                           "by_command": {k: round(v / worker_s, 3) for k, v in sorted(d["calls"].items(),
                                                                                        key=lambda kv: -kv[1])}}
            stop_fleet(idle)
            client.flushall()

            # 3 and 4. Throughput, without and with task events.
            busy = start_fleet(server, tmp, args.busy_workers, 0.0, "busy")
            a = stats(client)
            time.sleep(args.idle_s / 2)
            base = delta(a, stats(client))
            background = {"cpu_s": base["cpu_s"] / base["seconds"], "commands": base["commands"] / base["seconds"],
                          "net": base["net"] / base["seconds"]}
            out["throughput"] = run_batch(farm, client, args.jobs, background)
            out["paced"] = run_paced(farm, client, args.paced_jobs_per_s, args.paced_s, background)
            events = subscribe_events(server.url)
            from celery import Celery

            control = Celery("zfarm", broker=server.url)
            control.control.enable_events()
            wait_for(lambda: events.count() > 0, 30, what="a worker event after enable_events")
            out["with_events"] = run_batch(farm, client, args.jobs, background, events)
            events.close()
            stop_fleet(busy)
        finally:
            server.stop()
    return out


class EventCounter:
    """A subscriber on the event exchange's channels, as Flower's receiver is: counts and bytes."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe("*celeryev*")
        self.n, self.bytes = 0, 0

    def drain(self) -> None:
        while True:
            message = self.pubsub.get_message(timeout=0.01)
            if message is None:
                return
            if message["type"] == "pmessage":
                self.n += 1
                self.bytes += len(message["data"])

    def count(self) -> int:
        self.drain()
        return self.n

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


def subscribe_events(url: str) -> EventCounter:
    return EventCounter(url)


def run_batch(farm, client, n: int, background: dict, events: EventCounter | None = None) -> dict:
    if events:
        events.drain()
        events_before = (events.n, events.bytes)
    a = stats(client)
    t0 = time.time()
    batch = farm.submit([{"prompt": f"throughput {i}", "seed": i, "width": 512, "height": 512, "steps": 1}
                         for i in range(n)])
    status = wait_for(lambda: (lambda s: s if s["finished_at"] else None)(batch.status()), 600, interval_s=0.2,
                      what="the batch to finish")
    d = delta(a, stats(client))
    wall = float(status["finished_at"]) - t0
    net_cmds = d["commands"] - background["commands"] * d["seconds"]
    row = {"jobs": n, "jobs_per_s": round(n / wall, 1),
           "commands_per_job": round(net_cmds / n, 1),
           "cpu_ms_per_job": round(1000 * (d["cpu_s"] - background["cpu_s"] * d["seconds"]) / n, 4),
           "net_bytes_per_job": round((d["net"] - background["net"] * d["seconds"]) / n),
           "by_command": {k: round(v / n, 2) for k, v in sorted(d["calls"].items(), key=lambda kv: -kv[1])
                          if v / n >= 0.05}}
    if events:
        events.drain()
        row["events_per_job"] = round((events.n - events_before[0]) / n, 2)
        row["event_bytes_per_job"] = round((events.bytes - events_before[1]) / n)
    return row


def per_batch_commands(workers: int, tiers: int, lanes: int = 4) -> int:
    """Commands a submit spends besides its jobs: the registry read (SMEMBERS, two HGETALL a live
    worker), the lane pick (an LLEN per lane and tier, INCRBY) and the batch's transaction
    (WATCH, MULTI, 3 HSET, ZADD, SADD, EXEC and an LPUSH per queue)."""
    return 1 + 2 * workers + lanes * tiers + 1 + 8 + tiers


def sweep_commands_per_s(queues: int, active_batches: int, heartbeat_s: float, tiers: int) -> float:
    """The housekeeping lock's holder, each period with batches active: SMEMBERS, the deficit script
    (EVAL, an LLEN per queue, an HGET per active batch and tier, HLEN) and the suspects' DEL."""
    return (1 + 1 + queues + active_batches * (1 + tiers) + 1 + 1) / heartbeat_s


def run_paced(farm, client, jobs_per_s: float, seconds: float, background: dict) -> dict:
    """Jobs at a set rate (batches of 10), as a fleet below its ceiling sees them: Redis spends more
    CPU a command when few arrive at a time (each wakes its event loop on its own)."""
    a = stats(client)
    batches, t0 = [], time.time()
    for n in range(int(jobs_per_s * seconds / 10)):
        wait_until = t0 + n * 10 / jobs_per_s
        time.sleep(max(0.0, wait_until - time.time()))  # pacing: the submit schedule, not a wait on a condition
        batches.append(farm.submit([{"prompt": f"paced {n} {i}", "seed": i, "width": 512, "height": 512, "steps": 1}
                                    for i in range(10)]))
    wait_for(lambda: all(b.status()["finished_at"] for b in batches), 120, interval_s=0.5, what="the paced batches")
    d = delta(a, stats(client))
    n = 10 * len(batches)
    return {"jobs": n, "jobs_per_s": jobs_per_s, "batch_jobs": 10,
            "commands_per_job": round((d["commands"] - background["commands"] * d["seconds"]) / n, 1),
            "cpu_ms_per_job": round(1000 * (d["cpu_s"] - background["cpu_s"] * d["seconds"]) / n, 4)}


def model(m: dict, args) -> dict:
    """The ceilings per class, from the measured costs."""
    table = profiles.load_table(MEASURED_TABLE)
    cpu_job = m["throughput"]["cpu_ms_per_job"]
    cpu_job_events = m["with_events"]["cpu_ms_per_job"]
    cpu_worker_s = m["idle"]["cpu_ms_per_worker_s"]
    cpu_per_command = cpu_job / m["throughput"]["commands_per_job"]
    budget_ms = 1000 * args.redis_cpu_budget
    rows = {}
    for vram_class, card in CARDS.items():
        s = profiles.choose(table, vram_class, 64).s_per_image
        jobs_per_worker_s = 1 / (s * args.job_units)

        def per_worker(cpu_per_job: float, n: int) -> float:
            # Each worker's jobs, its idle-time background, and its share of the submits' registry reads.
            batch = per_batch_commands(n, args.tiers) * cpu_per_command / args.batch_jobs
            return jobs_per_worker_s * (cpu_per_job + batch) + cpu_worker_s

        ceiling = 1
        while (ceiling + 1) * per_worker(cpu_job, ceiling + 1) <= budget_ms:
            ceiling += 1
        with_flower = 1
        while (with_flower + 1) * per_worker(cpu_job_events, with_flower + 1) <= budget_ms:
            with_flower += 1
        rows[vram_class] = {
            "card": card, "s_per_image": s, "jobs_per_s_per_worker": round(jobs_per_worker_s, 3),
            "redis_cpu_ms_per_worker_s": round(per_worker(cpu_job, ceiling), 4), "ceiling_workers": ceiling,
            "ceiling_workers_with_flower": with_flower,
            "jobs_per_s_at_ceiling": round(ceiling * jobs_per_worker_s),
            "s3_puts_per_s_at_ceiling": round(2 * ceiling * jobs_per_worker_s),
            "flower_events_per_s_at_ceiling": round(ceiling * (jobs_per_worker_s * m["with_events"]["events_per_job"]
                                                               + args.worker_heartbeat_events_per_s)),
            "network_mbit_s_at_ceiling": round(8 * ceiling * (jobs_per_worker_s * m["throughput"]["net_bytes_per_job"]
                                                              + m["idle"]["net_bytes_per_worker_s"]) / 1e6, 1),
            "clients_at_ceiling": round(ceiling * m["clients_per_worker"]),
        }
    return {"redis_cpu_budget_cores": args.redis_cpu_budget,
            "job": f"{REFERENCE_JOB} x{args.job_units} work units, batches of {args.batch_jobs} jobs",
            "cpu_ms_per_command": round(cpu_per_command, 5), "classes": rows}


def check_soak(m: dict, soak: dict, args) -> dict:
    """Predict the soak's Redis CPU and commands from its jobs, worker-seconds, batches, joins and
    sweep periods; compare with what the soak measured."""
    jobs = soak["jobs_done_in_window"]
    worker_s = soak["workers_alive_mean"] * soak["duration_s"]
    workers = soak["workers_alive_mean"]
    tiers = args.tiers
    batches = soak["batches"]
    joins = soak["events"]["join"]
    periods_s = soak["duration_s"]
    # The soak ran at ~18 jobs/s: Redis's CPU a command at that rate is the paced run's.
    paced = m.get("paced") or m["throughput"]
    cpu_per_command = paced["cpu_ms_per_job"] / paced["commands_per_job"]
    extra_commands = (batches * per_batch_commands(round(workers), tiers)
                      + joins * m.get("commands_per_worker_start", 0)
                      + periods_s * sweep_commands_per_s(3 * tiers * 4, args.soak_active_batches, args.heartbeat_s, tiers))
    predicted_cmds = (jobs * m["throughput"]["commands_per_job"] + worker_s * m["idle"]["commands_per_worker_s"]
                      + extra_commands)
    predicted_cpu_s = (jobs * m["throughput"]["commands_per_job"] * cpu_per_command
                       + worker_s * m["idle"]["cpu_ms_per_worker_s"] + extra_commands * cpu_per_command) / 1000
    measured_cpu_s = soak["redis_per_job"]["cpu_ms"] * jobs / 1000
    measured_cmds = soak["redis_per_job"]["commands"] * jobs
    return {"jobs": jobs, "worker_seconds": round(worker_s), "batches": batches, "joins": joins,
            "extra_commands": round(extra_commands),
            "redis_cpu_s": {"predicted": round(predicted_cpu_s, 2), "measured": round(measured_cpu_s, 2),
                            "ratio": round(measured_cpu_s / predicted_cpu_s, 3)},
            "commands": {"predicted": round(predicted_cmds), "measured": round(measured_cmds),
                         "ratio": round(measured_cmds / predicted_cmds, 3)}}


def print_all(m: dict, mod: dict, check: dict | None) -> None:
    t, e, i = m["throughput"], m["with_events"], m["idle"]
    print(f"Redis {m.get('redis')}, {m.get('cpus')} CPUs")
    print(f"per job ({t['jobs']} jobs at {t['jobs_per_s']}/s): {t['commands_per_job']} commands, "
          f"{t['cpu_ms_per_job']} ms CPU, {t['net_bytes_per_job']} B network; with task events: "
          f"{e['commands_per_job']} commands, {e['cpu_ms_per_job']} ms, {e['events_per_job']} events "
          f"({e['event_bytes_per_job']} B)")
    if m.get("paced"):
        p = m["paced"]
        print(f"paced at {p['jobs_per_s']} jobs/s in batches of {p['batch_jobs']}: {p['commands_per_job']} commands, "
              f"{p['cpu_ms_per_job']} ms CPU a job")
    print(f"per idle worker-second ({i['workers']} workers, {i['seconds']} s): {i['commands_per_worker_s']} commands, "
          f"{i['cpu_ms_per_worker_s']} ms CPU, {i['net_bytes_per_worker_s']} B network")
    print(f"memory: {m['memory_per_queued_job_bytes']} B per queued job, {m['memory_per_worker_bytes']} B per worker "
          f"({m['registry_bytes_per_worker']} B of it its registry keys), {m['clients_per_worker']} clients per worker")
    print(f"ceilings at {mod['redis_cpu_budget_cores']} of a core, {mod['job']}:")
    cols = ("card", "s_per_image", "ceiling_workers", "ceiling_workers_with_flower", "jobs_per_s_at_ceiling",
            "s3_puts_per_s_at_ceiling", "flower_events_per_s_at_ceiling", "network_mbit_s_at_ceiling", "clients_at_ceiling")
    print("  ".join(cols))
    for row in mod["classes"].values():
        print("  ".join(str(row[c]) for c in cols))
    if m.get("commands_per_worker_start"):
        print(f"a worker's start: {m['commands_per_worker_start']} commands (registration, its queues declared)")
    if check:
        print(f"soak check ({check['batches']} batches, {check['joins']} joins: {check['extra_commands']} commands "
              f"besides jobs and workers): Redis CPU predicted {check['redis_cpu_s']['predicted']} s, measured "
              f"{check['redis_cpu_s']['measured']} s (x{check['redis_cpu_s']['ratio']}); commands predicted "
              f"{check['commands']['predicted']}, measured {check['commands']['measured']} (x{check['commands']['ratio']})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle-workers", type=int, default=32)
    ap.add_argument("--busy-workers", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--idle-s", type=float, default=30.0)
    ap.add_argument("--paced-jobs-per-s", type=float, default=20.0, help="the paced run's rate (the soak's is ~18)")
    ap.add_argument("--paced-s", type=float, default=30.0)
    ap.add_argument("--redis-cpu-budget", type=float, default=0.5,
                    help="share of one core Redis may use; the rest is headroom for bursts, AOF rewrites, failover")
    ap.add_argument("--job-units", type=float, default=1.0, help="the mean job, in 1024x1024 8-step images")
    ap.add_argument("--batch-jobs", type=float, default=100.0,
                    help="the mean batch: each submit reads the whole registry, so small batches cost more per job")
    ap.add_argument("--tiers", type=int, default=4, help="size tiers of the profile table (4 for the measured one)")
    ap.add_argument("--heartbeat-s", type=float, default=5.0)
    ap.add_argument("--soak-active-batches", type=int, default=10,
                    help="batches active at a time in the soak (its producers keep 20 s of work queued)")
    ap.add_argument("--worker-heartbeat-events-per-s", type=float, default=0.5,
                    help="Celery's worker-heartbeat events per worker-second (every 2 s by default)")
    ap.add_argument("--from", dest="from_file", help="read the measurements from this JSON instead of measuring")
    ap.add_argument("--soak", help="a soak's JSON (bench/soak.py --json) to check the model against")
    ap.add_argument("--json", help="write measurements, model and check to this file")
    args = ap.parse_args(argv)
    m = json.loads(Path(args.from_file).read_text())["measured"] if args.from_file else measure(args)
    mod = model(m, args)
    check = check_soak(m, json.loads(Path(args.soak).read_text()), args) if args.soak else None
    print_all(m, mod, check)
    if args.json:
        Path(args.json).write_text(json.dumps({"measured": m, "model": mod, "soak_check": check}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
