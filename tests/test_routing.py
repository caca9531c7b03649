"""Mixed fleets share one queue system: routing by size, priorities, lanes, speed-proportional sharing.

Real redis-server, real `python -m worker` subprocesses with the simulated renderer and the test
profile table (class 12 renders up to 1024x1024, class 24 up to 2048x2048). Each job's sidecar
says which worker rendered it, on what class, and when: its render ran from finished_at - render_s
to finished_at. Assertions compare orders and shares with tolerance, never exact timings: other
tests may share this machine's two cores.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from farm import REPO, base_env, wait_for, workers_blocked_on_job_queues
from farm_fixtures import TEST_TABLE
from shared import keys, registry

SMALL_PX = 1024 * 1024   # tier "any": every class renders it
LARGE_PX = 2048 * 2048   # tier "c24": only class 24 and up
FINISH_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Rendered:
    """One job as its sidecar tells it."""
    batch_id: str
    index: int
    worker: str
    vram_class: object
    pixels: int
    start: float
    end: float


def _jobs(sizes, label: str = "job") -> list[dict]:
    return [{"prompt": f"{label} {i}", "seed": i, "width": w, "height": h} for i, (w, h) in enumerate(sizes)]


def _start_ready(start_worker, client, storage_url: str, *arg_sets, idle: bool = True) -> list:
    """Start several workers at once (they boot in parallel), then wait until each is ready and,
    with `idle`, blocked in BRPOP on its job queues, as a worker idle in production is."""
    procs = [start_worker(storage_url, args, wait_ready=False) for args in arg_sets]

    def all_ready():
        for proc in procs:
            if proc.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.proc.returncode}:\n{proc.output()[-3000:]}")
        live = {w.get("pid"): w for w in registry.live_workers(client) if w.get("state") == "ready"}
        return live if all(p.proc.pid in live for p in procs) else None

    live = wait_for(all_ready, 60, what="every worker to be ready")
    for proc in procs:
        proc.registration = live[proc.proc.pid]
        proc.name = proc.registration["name"]
    if idle:
        wait_for(lambda: workers_blocked_on_job_queues(client) >= len(procs), 30,
                 what="every worker to block on its job queues")
    return procs


def _finished(batch, timeout_s: float = FINISH_TIMEOUT_S) -> dict:
    def final():
        status = batch.status()
        return status if status["done"] + status["failed"] + status["cancelled"] >= status["total"] else None
    return wait_for(final, timeout_s, interval_s=0.1, what=f"batch {batch.id} to finish")


def _rendered(farm, *batch_ids: str) -> list[Rendered]:
    """Every rendered job of the batches, in the order their renders started."""
    out = []
    for batch_id in batch_ids:
        for name in farm.storage.list(f"{batch_id}/"):
            if name.endswith(".json"):
                s = json.loads(farm.storage.get(name))
                out.append(Rendered(s["batch_id"], s["index"], s["worker"], s["vram_class"],
                                    s["width"] * s["height"], s["finished_at"] - s["render_s"], s["finished_at"]))
    return sorted(out, key=lambda r: r.start)


def _labels(jobs: list[Rendered], names: dict[str, str]) -> str:
    """One letter per job, in start order: names maps batch ids to letters."""
    return "".join(names[j.batch_id] for j in jobs)


# Routing by size
def test_a_12_gb_worker_never_receives_a_job_above_its_max_pixels_and_a_24_gb_worker_takes_them_first(
        start_worker, farm_factory, file_storage_url, redis_client):
    small, large = _start_ready(start_worker, redis_client, file_storage_url,
                                ("--vram-gb", "12", "--simulate", "0.1", "--name", "small-card"),
                                ("--vram-gb", "24", "--simulate", "0.1", "--name", "large-card"))
    assert (small.registration["max_pixels"], large.registration["max_pixels"]) == (SMALL_PX, LARGE_PX)
    # Job 0 is small: were queues pushed in job order, Redis would hand the idle 24 GB worker, blocked
    # on both queues, a small job first (a blocked client gets the list pushed first, not named first).
    sizes = [(1024, 1024), (2048, 2048), (768, 768), (1536, 1536), (1024, 1024), (512, 512)] * 3
    farm = farm_factory(file_storage_url)
    batch = farm.submit(_jobs(sizes))
    status = _finished(batch)
    assert (status["done"], status["failed"]) == (len(sizes), 0)

    jobs = _rendered(farm, batch.id)
    oversized = [j for j in jobs if j.pixels > SMALL_PX]
    assert len(oversized) == 6
    assert all(j.worker == large.name and j.vram_class == 24 for j in oversized)
    assert all(j.pixels <= SMALL_PX and j.vram_class == 12 for j in jobs if j.worker == small.name)
    # The small card keeps taking everything it can: most of the small jobs are its.
    assert sum(j.worker == small.name for j in jobs) >= 6
    # The capable card serves the large-job queue before the shared one, the largest jobs first.
    on_large = [j.pixels for j in jobs if j.worker == large.name]
    assert on_large[:6] == [LARGE_PX] * 3 + [1536 * 1536] * 3, on_large
    assert all(px <= SMALL_PX for px in on_large[6:]), on_large


def _zfarm(redis_url: str, storage_url: str, *args) -> subprocess.CompletedProcess:
    env = base_env(redis_url, storage_url, ZFARM_PROFILE_TABLE=str(TEST_TABLE))
    return subprocess.run([sys.executable, "-m", "producer.cli", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_submit_refuses_a_job_no_live_worker_can_take_unless_allowed_pending_then_it_waits_for_a_capable_worker(
        start_worker, farm_factory, redis_server, file_storage_url, redis_client, tmp_path):
    (small,) = _start_ready(start_worker, redis_client, file_storage_url,
                            ("--vram-gb", "12", "--simulate", "0.05", "--name", "small-card"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in (
        {"prompt": "a fox", "width": 1024, "height": 1024},
        {"prompt": "an owl", "width": 768, "height": 768},
        {"prompt": "a wide harbour panorama", "width": 2048, "height": 2048},
        {"prompt": "a cat", "width": 1024, "height": 768})))

    refused = _zfarm(redis_server, file_storage_url, "submit", prompts)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "prompts.jsonl:3 is 2048x2048 (4194304 px)" in refused.stderr
    assert "live classes: 12g 1048576 px" in refused.stderr and "--allow-pending" in refused.stderr
    assert redis_client.keys("zfarm.*") == [] and redis_client.zcard(keys.BATCHES) == 0

    accepted = _zfarm(redis_server, file_storage_url, "submit", prompts, "--allow-pending")
    assert accepted.returncode == 0, accepted.stderr
    assert "1 job(s) wait for a worker larger than any live one" in accepted.stderr
    batch = farm_factory(file_storage_url).batch(accepted.stdout.split()[-1])
    wait_for(lambda: batch.status()["done"] == 3, FINISH_TIMEOUT_S, what="the small jobs to render")

    shown = _zfarm(redis_server, file_storage_url, "status", batch.id, "--json")
    status = json.loads(shown.stdout)
    assert (status["done"], status["running"], status["queued"], status["waiting_for_worker"]) == (3, 0, 0, 1)
    table = _zfarm(redis_server, file_storage_url, "status", batch.id).stdout
    assert "waiting_for_worker\t1" in table and "queued\t0" in table

    (large,) = _start_ready(start_worker, redis_client, file_storage_url,
                            ("--vram-gb", "24", "--simulate", "0.05", "--name", "large-card"), idle=False)
    status = _finished(batch)
    assert (status["done"], status["waiting_for_worker"], status["queued"]) == (4, 0, 0)
    by_index = {j.index: j for j in _rendered(batch.farm, batch.id)}
    assert (by_index[2].worker, by_index[2].vram_class) == (large.name, 24)
    assert {by_index[i].worker for i in (0, 1, 3)} == {small.name}


# Priorities
def test_a_high_priority_batch_behind_many_normal_jobs_starts_on_each_worker_after_its_current_job(
        start_worker, farm_factory, file_storage_url, redis_client):
    job_s = 0.4
    workers = _start_ready(start_worker, redis_client, file_storage_url,
                           *[("--vram-gb", "24", "--simulate", str(job_s), "--name", f"w{i}") for i in range(2)])
    farm = farm_factory(file_storage_url)
    normal = farm.submit(_jobs([(1024, 1024)] * 30, "normal"))
    wait_for(lambda: (lambda s: s["done"] >= 2 and s["running"] == 2)(normal.status()), 30,
             what="both workers to be busy with normal jobs")
    submitted_at = time.time()
    high = farm.submit(_jobs([(1024, 1024)] * 6, "high"), priority="high")
    _finished(high)
    normal.cancel()  # the rest of the normal jobs would only cost test time
    _finished(normal)

    jobs = _rendered(farm, normal.id, high.id)
    for worker in workers:
        after = [j for j in jobs if j.worker == worker.name and j.start >= submitted_at]
        labels = _labels(after, {normal.id: "N", high.id: "H"})
        # At most the one normal job it had already popped, then high jobs until none is left.
        assert re.fullmatch(r"N?H+N*", labels), (worker.name, labels)
        first_high = next(j for j in after if j.batch_id == high.id)
        assert first_high.start - submitted_at < 2 * job_s + 3.0


def test_low_priority_jobs_run_only_when_no_other_job_waits(
        start_worker, farm_factory, file_storage_url, redis_client):
    farm = farm_factory(file_storage_url)
    low = farm.submit(_jobs([(1024, 1024)] * 12, "low"), priority="low")
    normal = farm.submit(_jobs([(1024, 1024)] * 3, "normal"))
    _start_ready(start_worker, redis_client, file_storage_url, ("--simulate", "0.25", "--name", "only"), idle=False)
    wait_for(lambda: low.status()["done"] >= 2, FINISH_TIMEOUT_S, what="some low jobs to render")
    submitted_at = time.time()
    later = farm.submit(_jobs([(1024, 1024)] * 2, "later"))
    for batch in (normal, later, low):
        _finished(batch)

    jobs = _rendered(farm, low.id, normal.id, later.id)
    labels = _labels(jobs, {low.id: "L", normal.id: "N", later.id: "M"})
    assert re.fullmatch(r"NNNL+MML+", labels), labels
    # The later normal jobs start next, after at most the one low job popped as they were pushed.
    assert sum(1 for j in jobs if j.batch_id == low.id and submitted_at <= j.start
               < min(j.start for j in jobs if j.batch_id == later.id)) <= 1


# Lanes
def test_two_batches_submitted_at_the_same_time_share_the_fleet_and_interleave(
        start_worker, farm_factory, file_storage_url, redis_client):
    _start_ready(start_worker, redis_client, file_storage_url,
                 *[("--simulate", "0.15", "--name", f"w{i}") for i in range(2)])
    barrier, batches = threading.Barrier(2), {}

    def submit(label):
        farm = farm_factory(file_storage_url)
        barrier.wait()
        batches[label] = farm.submit(_jobs([(1024, 1024)] * 12, label))

    threads = [threading.Thread(target=submit, args=(label,)) for label in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = batches["A"], batches["B"]
    assert a.status()["meta"]["lane"] != b.status()["meta"]["lane"]
    _finished(a)
    _finished(b)

    jobs = sorted(_rendered(a.farm, a.id, b.id), key=lambda j: j.end)
    order = _labels(jobs, {a.id: "A", b.id: "B"})
    first_done = min(order.rfind("A"), order.rfind("B"))
    # Both batches progress together: when the first one is done, the other is nearly done too,
    # and until then neither batch runs more than a few jobs in a row.
    assert first_done + 1 >= 12 + 8, order
    assert max(len(run) for run in re.findall(r"A+|B+", order[:first_done + 1])) <= 3, order


# Speed-proportional sharing
def test_a_fast_and_a_slow_worker_share_one_queue_in_proportion_to_their_speed_and_neither_idles(
        start_worker, farm_factory, file_storage_url, redis_client):
    fast_s, slow_s = 0.15, 0.45
    fast, slow = _start_ready(start_worker, redis_client, file_storage_url,
                              ("--simulate", str(fast_s), "--name", "fast"),
                              ("--simulate", str(slow_s), "--name", "slow"))
    farm = farm_factory(file_storage_url)
    batch = farm.submit(_jobs([(1024, 1024)] * 36))
    _finished(batch)

    jobs = _rendered(farm, batch.id)
    fast_share = sum(j.worker == fast.name for j in jobs) / len(jobs)
    speed_share = (1 / fast_s) / (1 / fast_s + 1 / slow_s)  # 0.75
    assert abs(fast_share - speed_share) <= 0.12, fast_share
    # Neither idles while work waits: from its first job until the last job was handed out, each
    # worker goes from one job to the next without a pause.
    last_start = max(j.start for j in jobs)
    for worker in (fast, slow):
        mine = [j for j in jobs if j.worker == worker.name]
        gaps = [b.start - a.end for a, b in zip(mine, mine[1:]) if b.start <= last_start]
        assert mine[0].start - jobs[0].start < 1.0 and max(gaps) < 1.0, (worker.name, gaps)
        assert last_start - mine[-1].end < 1.0, worker.name
