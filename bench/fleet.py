"""Fleet benchmark: a mixed fleet of simulated workers on one queue system, makespan against the ideal.

    python bench/fleet.py                           # 8 workers: 3 x 12 GB, 3 x 24 GB, 2 x 80 GB, 400 jobs
    python bench/fleet.py --fleet 12x4,24x2,80x2 --jobs 400 --target-s 60 --json

Each worker is a real `python -m worker --vram-gb N --simulate S` process (one rendering process,
as a GPU worker runs), whose class sets its queues and whose S is its class's measured seconds per
1024x1024 8-step image, times one scale factor chosen so that the ideal run takes --target-s. The
per-class speeds and max_pixels come from bench/results/profile_table.json when it exists, else
from the reference measurements in shared/reference/gpu-profiles.md (the table this script
writes for them, and what it assumes, are printed).

Printed: makespan (submit to the ledger's record of the last job stored) against the ideal (total
work / sum of the workers' rates), efficiency = ideal / makespan (target >= 0.95), the bound that
routing imposes (work only large cards may take, over their rate), each class's share of jobs and
of work against its share of the fleet's speed, each worker's busy fraction, and the CPU the fleet's
processes used: the simulated renderer sleeps, so on a small machine only the per-job overhead
competes for cores.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from farm import RedisServer, WorkerProcess, base_env, wait_for, workers_blocked_on_job_queues  # noqa: E402  (tests/farm.py)
from shared import profiles, registry, routing  # noqa: E402

MEASURED_TABLE = REPO / "bench" / "results" / "profile_table.json"
TARGET_EFFICIENCY = 0.95
# (width, height, share of jobs) at 8 steps: most jobs fit every card, a third need a large one.
SIZE_MIX = ((512, 512, 0.25), (768, 768, 0.2), (1024, 1024, 0.25), (1024, 768, 0.1),
            (1536, 1536, 0.12), (2048, 2048, 0.08))

# shared/reference/gpu-profiles.md, H100 80GB under allocator caps, 1024x1024, 8 forwards unless noted.
# The fastest profile that fits each class's cap with its headroom:
#   12 GB (cap 11): group_stream, 3.30 s/img (9 forwards), peak reserved 4.5 GiB, host RSS 44.6 GiB;
#   24 GB (cap 23): text encoder fp8 + DiT regional compile, 0.93 s/img, 19.8 GiB, RSS 15.8 GiB;
#   80 GB: the same profile is the fastest measured (full + compile: 0.96 s/img).
# Only 1024x1024 was measured there; the max_pixels below are this benchmark's assumption.
REFERENCE_TABLE = {
    "schema": 1,
    "measured": {"device": "reference: shared/reference/gpu-profiles.md (H100 under caps)", "size": 1024,
                 "steps": 8},
    "runs": [
        {"profile": "group_stream", "cap_gib": 11.0, "ok": True, "s_per_image": 3.30, "peak_reserved_gib": 4.5,
         "host_rss_gib": 44.6, "max_pixels": 1024 * 1024},
        {"profile": "te_fp8_compile", "cap_gib": 23.0, "ok": True, "s_per_image": 0.93,
         "peak_reserved_gib": 19.8, "host_rss_gib": 15.8, "max_pixels": 2048 * 2048},
    ],
}


def parse_fleet(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        vram_class, _, count = part.partition("x")
        out += [int(vram_class)] * int(count or 1)
    return out


def make_jobs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    jobs = []
    for width, height, share in SIZE_MIX:
        jobs += [{"width": width, "height": height}] * round(n * share)
    jobs = (jobs + [{"width": 1024, "height": 1024}] * n)[:n]
    rng.shuffle(jobs)
    return [{"prompt": f"fleet job {i}", "seed": i, "steps": 8, **job} for i, job in enumerate(jobs)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default="12x3,24x3,80x2", help="classes and counts, e.g. 12x3,24x3,80x2")
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--target-s", type=float, default=60.0, help="the ideal run's length; speeds are scaled to it")
    ap.add_argument("--table", help="profile table, or 'reference' for the reference numbers "
                                    "(default: bench/results/profile_table.json if it exists, else the reference)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--order", choices=("shuffled", "largest-first"), default="shuffled",
                    help="order of the jobs in the submitted file")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="zfarm-fleet-") as tmp:
        tmp = Path(tmp)
        table_path = Path(args.table) if args.table and args.table != "reference" else MEASURED_TABLE
        if table_path.exists() and args.table != "reference":
            source = f"measured: {table_path}"
        else:
            table_path = tmp / "reference_table.json"
            table_path.write_text(json.dumps(REFERENCE_TABLE))
            source = "reference numbers of shared/reference/gpu-profiles.md, max_pixels assumed"
        table = profiles.load_table(table_path)
        summary = run(args, tmp, table_path, table)
        summary["speeds_from"] = source
    _print(summary)
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["efficiency"] >= TARGET_EFFICIENCY else 1


def run(args, tmp: Path, table_path: Path, table: dict) -> dict:
    fleet = parse_fleet(args.fleet)
    choice = {c: profiles.choose(table, c) for c in set(fleet)}
    jobs = make_jobs(args.jobs, args.seed)
    if args.order == "largest-first":
        jobs.sort(key=lambda j: -j["width"] * j["height"])
    work = [routing.work_units(j["width"] * j["height"], j["steps"]) for j in jobs]
    max_pixels = profiles.max_pixels_by_class(table)
    unscaled_rate = sum(1 / choice[c].s_per_image for c in fleet)
    scale = args.target_s / (sum(work) / unscaled_rate)
    s_per_image = {c: choice[c].s_per_image * scale for c in set(fleet)}
    rate = {c: 1 / s for c, s in s_per_image.items()}
    total_rate = sum(rate[c] for c in fleet)
    ideal_s = sum(work) / total_rate
    # Routing's own bound: jobs above a class's max_pixels can only go to larger classes.
    routing_bound_s = ideal_s
    for level in sorted({choice[c].max_pixels for c in fleet}):
        above = sum(w for j, w in zip(jobs, work) if j["width"] * j["height"] > level)
        able = sum(rate[c] for c in fleet if choice[c].max_pixels > level)
        if above and able:
            routing_bound_s = max(routing_bound_s, above / able)

    server = RedisServer(tmp / "redis").start()
    storage_url = f"file://{tmp / 'results'}"
    env = base_env(server.url, storage_url, ZFARM_PROFILE_TABLE=str(table_path), ZFARM_HEARTBEAT_S="5",
                   ZFARM_REGISTRY_TTL_S="15")
    workers = []
    try:
        for i, vram_class in enumerate(fleet):
            workers.append(WorkerProcess(env, ["--vram-gb", str(vram_class), "--simulate", f"{s_per_image[vram_class]:.4f}",
                                               "--name", f"fleet-{vram_class}g-{i}", "--loglevel", "WARNING"],
                                         tmp / f"worker-{i}.log").start())
        client = server.client()
        wait_for(lambda: len([w for w in registry.live_workers(client) if w.get("state") == "ready"]) == len(fleet),
                 120, what="every worker to be ready")
        wait_for(lambda: workers_blocked_on_job_queues(client) >= len(fleet), 30,
                 what="every worker to block on its job queues")

        from producer.api import Farm

        farm = Farm.from_env(table=table, redis_url=server.url, storage_url=storage_url)
        processes = [psutil.Process(w.proc.pid) for w in workers]
        processes += [child for p in processes for child in p.children(recursive=True)]
        cpu_before = sum(sum(p.cpu_times()[:2]) for p in processes)
        load_before = os.getloadavg()[0]
        t0 = time.time()
        batch = farm.submit(jobs)
        status = batch.wait(timeout_s=20 * args.target_s)
        wall_s = time.time() - t0
        cpu_s = sum(sum(p.cpu_times()[:2]) for p in processes) - cpu_before
        load_after = os.getloadavg()[0]
        if status["done"] != len(jobs):
            raise SystemExit(f"{status['done']} of {len(jobs)} jobs done, {status['failed']} failed")
        sidecars = [json.loads(farm.storage.get(name)) for name in farm.storage.list(f"{batch.id}/")
                    if name.endswith(".json")]
    finally:
        for w in workers:
            w.stop()
        server.stop()

    makespan_s = float(status["finished_at"]) - t0
    classes = sorted(set(fleet))
    by_class = {}
    for c in classes:
        mine = [s for s in sidecars if s["vram_class"] == c]
        by_class[c] = {
            "workers": fleet.count(c), "s_per_image": round(s_per_image[c], 3),
            "max_pixels": choice[c].max_pixels, "profile": choice[c].profile,
            "speed_share": round(rate[c] * fleet.count(c) / total_rate, 3),
            "job_share": round(len(mine) / len(sidecars), 3),
            "work_share": round(sum(routing.work_units(s["width"] * s["height"], s["steps"]) for s in mine)
                                / sum(work), 3),
            "largest_job_px": max((s["width"] * s["height"] for s in mine), default=0),
        }
    busy, per_worker = {}, {}
    for s in sidecars:
        busy[s["worker"]] = busy.get(s["worker"], 0.0) + s["render_s"]
        per_worker.setdefault(s["worker"], []).append((s["finished_at"] - s["render_s"], s["finished_at"]))
    # Between one render's end and the next one's start: storing, recording, acking, the next pop.
    gaps = [b[0] - a[1] for spans in per_worker.values() for a, b in zip(sorted(spans), sorted(spans)[1:])]
    end = float(status["finished_at"])
    tail = {w: end - max(e for _, e in spans) for w, spans in per_worker.items()}
    return {
        "fleet": args.fleet, "order": args.order, "workers": len(fleet), "jobs": len(jobs), "work_units": round(sum(work), 1),
        "scale": round(scale, 4), "tiers": routing.tier_ceilings(max_pixels),
        "ideal_s": round(ideal_s, 2), "routing_bound_s": round(routing_bound_s, 2),
        "makespan_s": round(makespan_s, 2), "efficiency": round(ideal_s / makespan_s, 4),
        "efficiency_vs_routing_bound": round(routing_bound_s / makespan_s, 4),
        "classes": by_class,
        "busy_fraction": {w: round(b / makespan_s, 3) for w, b in sorted(busy.items())},
        "gap_between_jobs_ms": {"median": round(1000 * statistics.median(gaps), 1),
                                "p99": round(1000 * sorted(gaps)[int(0.99 * (len(gaps) - 1))], 1),
                                "total_s": round(sum(gaps), 2)},
        "idle_at_end_s": {"mean": round(statistics.mean(tail.values()), 2), "max": round(max(tail.values()), 2)},
        "fleet_cpu_s": round(cpu_s, 1), "fleet_cpu_share_of_machine": round(cpu_s / wall_s / os.cpu_count(), 3),
        "loadavg_1m": [round(load_before, 2), round(load_after, 2)], "cpus": os.cpu_count(),
        "target_efficiency": TARGET_EFFICIENCY,
    }


def _print(s: dict) -> None:
    out = sys.stderr
    print(f"speeds from {s['speeds_from']}", file=out)
    print(f"fleet {s['fleet']} ({s['workers']} workers), {s['jobs']} jobs in {s['order']} order, {s['work_units']} reference images of work; "
          f"speeds scaled x{s['scale']}; tiers {s['tiers']}", file=out)
    print(f"makespan {s['makespan_s']} s, ideal {s['ideal_s']} s (routing bound {s['routing_bound_s']} s): "
          f"efficiency {s['efficiency']} (target >= {s['target_efficiency']})", file=out)
    print(f"{'class':>6}{'workers':>8}{'s/img':>8}{'max px':>10}{'speed share':>13}{'job share':>11}"
          f"{'work share':>12}{'largest job':>13}", file=out)
    for c, r in s["classes"].items():
        print(f"{c:>5}g{r['workers']:>8}{r['s_per_image']:>8.3f}{r['max_pixels']:>10}{r['speed_share']:>13.3f}"
              f"{r['job_share']:>11.3f}{r['work_share']:>12.3f}{r['largest_job_px']:>13}", file=out)
    print("busy fraction: " + ", ".join(f"{w.split('@')[0]} {b}" for w, b in s["busy_fraction"].items()), file=out)
    gap, tail = s["gap_between_jobs_ms"], s["idle_at_end_s"]
    print(f"between jobs on a worker: median {gap['median']} ms, p99 {gap['p99']} ms, {gap['total_s']} s in all; "
          f"idle after its last job: mean {tail['mean']} s, max {tail['max']} s", file=out)
    print(f"fleet processes used {s['fleet_cpu_s']} CPU s ({100 * s['fleet_cpu_share_of_machine']:.1f}% of "
          f"{s['cpus']} cores over the run); load average {s['loadavg_1m'][0]} -> {s['loadavg_1m'][1]}", file=out)


if __name__ == "__main__":
    sys.exit(main())
