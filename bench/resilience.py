"""Resilience: each no-job-lost scenario once, with what it cost.

    python bench/resilience.py                     # every scenario, about three minutes
    python bench/resilience.py --only redis storage --json bench/results/resilience.json

Each scenario runs on a fresh farm (the harness of tests/test_no_job_lost.py: a private
redis-server, moto's S3 server with a versioned bucket, `python -m worker --simulate S`
subprocesses) and prints a table as it ends, then all of them together:

- jobs: jobs accepted (for the malformed-message scenario: messages pushed).
- done / failed / cancelled: final ledger counts; `expected failed` says how many failures the
  scenario's input deserves (a time limit, an upload that never lands, a malformed message).
- lost: jobs not final at the end, plus done jobs whose PNG or sidecar is missing in storage
  (messages with no record at all, for malformed messages).
- stored twice: result keys written more than once (S3 versions); a second write lands at the
  same key, and `same image` says whether every PNG version is byte-identical.
- counted twice: renders counted more than once (workers' jobs_done summed, less the ledger's
  done): a job rendered twice is still counted once.
- recovery s: from the disruption (kill, signal, restart, storage back; for a lost message, the
  worker being ready) to the next job completed that the disruption had held up.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

for _name, _value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                      "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_name, _value)  # moto takes any credentials; boto3 wants some

import psutil  # noqa: E402

from farm import wait_for  # noqa: E402  (tests/farm.py)
from shared import keys  # noqa: E402
from shared.ledger import MAX_ATTEMPTS  # noqa: E402
from test_no_job_lost import (  # noqa: E402
    FAST_S,
    REDIS_DOWN_S,
    SLOW_S,
    Rig,
    claimed_by,
    malformed_messages,
    set_time_limit,
    specs,
    zfarm_cli,
)

COLUMNS = ("scenario", "jobs", "done", "failed", "expected failed", "cancelled", "lost", "stored twice",
           "same image", "counted twice", "recovery s")


def wait_finished(rig: Rig, batch_id: str, timeout_s: float) -> dict:
    return wait_for(lambda: (lambda s: s if s["finished_at"] else None)(rig.ledger.status(batch_id)), timeout_s,
                    interval_s=0.1, what=f"batch {batch_id} to finish")


def wait_done(rig: Rig, batch_id: str, index: int, timeout_s: float) -> float:
    """Seconds until job `index` is final, polled from now."""
    started = time.monotonic()
    wait_for(lambda: rig.ledger.state(batch_id, index) in ("done", "failed"), timeout_s, interval_s=0.05,
             what=f"job {index} of {batch_id}")
    return time.monotonic() - started


def outcome(rig: Rig, name: str, batch_ids: list[str], workers: list[str], expected_failed: int = 0,
            recovery_s: float | None = None) -> dict:
    """One table row: the final ledger counts of the batches and what storage holds for them."""
    row = {"scenario": name, "jobs": 0, "done": 0, "failed": 0, "cancelled": 0, "lost": 0,
           "stored twice": 0, "same image": True, "expected failed": expected_failed}
    for batch_id in batch_ids:
        status = rig.ledger.status(batch_id)
        row["jobs"] += status["total"]
        for field in ("done", "failed", "cancelled"):
            row[field] += status[field]
        row["lost"] += status["total"] - status["done"] - status["failed"] - status["cancelled"]
        versions = rig.versions(batch_id)
        states = rig.ledger.states(batch_id)
        row["lost"] += sum(1 for index, state in states.items() if state == "done" and not all(
            f"{batch_id}/{index:06d}.{ext}" in versions for ext in ("png", "json")))
        pngs = {k: v for k, v in versions.items() if k.endswith(".png")}
        row["stored twice"] += sum(1 for v in pngs.values() if len(v) > 1)
        row["same image"] = row["same image"] and all(len(set(v)) == 1 for v in pngs.values())
    row["counted twice"] = max(0, sum(rig.jobs_done_by(w) for w in workers) - row["done"])
    row["recovery s"] = None if recovery_s is None else round(recovery_s, 1)
    return row


# Scenarios: each takes a fresh Rig and returns its row.

def kill_other_worker(rig: Rig) -> dict:
    rig.worker("doomed", simulate_s=SLOW_S)
    batch = rig.farm().submit(specs(20))
    index = claimed_by(rig, batch.id, "doomed")
    rig.worker("rescuer", simulate_s=FAST_S)
    doomed = rig.workers[0]
    doomed.kill_group()
    recovery_s = wait_done(rig, batch.id, index, 60)
    wait_finished(rig, batch.id, 60)
    return outcome(rig, "kill -9 mid-render, another worker", [batch.id], ["doomed", "rescuer"],
                   recovery_s=recovery_s)


def kill_and_restart(rig: Rig) -> dict:
    first = rig.worker("phoenix", simulate_s=SLOW_S)
    batch = rig.farm().submit(specs(5))
    index = claimed_by(rig, batch.id, "phoenix")
    killed_at = time.monotonic()
    first.kill_group()
    rig.worker("phoenix", simulate_s=FAST_S)
    wait_done(rig, batch.id, index, 60)
    recovery_s = time.monotonic() - killed_at
    wait_finished(rig, batch.id, 60)
    return outcome(rig, "kill -9 mid-render, same worker restarted", [batch.id], ["phoenix"],
                   recovery_s=recovery_s)


def sigterm_short(rig: Rig) -> dict:
    grace_s = 6.0
    worker = rig.worker("spot", simulate_s=2.0, ZFARM_SHUTDOWN_GRACE_S=grace_s)
    batch = rig.farm().submit(specs(5))
    index = claimed_by(rig, batch.id, "spot")
    signalled_at = time.monotonic()
    worker.signal(signal.SIGTERM)
    wait_done(rig, batch.id, index, grace_s + 10)
    recovery_s = time.monotonic() - signalled_at
    if worker.proc.wait(grace_s + 20) != 0:
        raise RuntimeError(f"the worker exited {worker.proc.returncode} after SIGTERM")
    rig.worker("next", simulate_s=FAST_S)
    wait_finished(rig, batch.id, 60)
    return outcome(rig, f"SIGTERM, job 2 s < grace {grace_s:g} s", [batch.id], ["spot", "next"],
                   recovery_s=recovery_s)


def sigterm_long(rig: Rig) -> dict:
    grace_s = 2.0
    worker = rig.worker("spot", simulate_s=SLOW_S, ZFARM_SHUTDOWN_GRACE_S=grace_s)
    batch = rig.farm().submit(specs(5))
    index = claimed_by(rig, batch.id, "spot")
    rig.worker("steady", simulate_s=FAST_S)
    signalled_at = time.monotonic()
    worker.signal(signal.SIGTERM)
    wait_done(rig, batch.id, index, grace_s + 30)
    recovery_s = time.monotonic() - signalled_at
    if worker.proc.wait(30) != 0:
        raise RuntimeError(f"the worker exited {worker.proc.returncode} after SIGTERM")
    wait_finished(rig, batch.id, 60)
    return outcome(rig, f"SIGTERM, job {SLOW_S:g} s > grace {grace_s:g} s", [batch.id], ["spot", "steady"],
                   recovery_s=recovery_s)


def poison_job(rig: Rig) -> dict:
    worker = rig.worker("victim", simulate_s=SLOW_S)
    batch = rig.farm().submit(specs(1))
    for attempt in range(1, MAX_ATTEMPTS + 1):
        wait_for(lambda: rig.attempts(batch.id, 0) == attempt and rig.claim(batch.id, 0), 30,
                 what=f"attempt {attempt}")
        children = [c for c in psutil.Process(worker.proc.pid).children() if c.status() != psutil.STATUS_ZOMBIE]
        children[0].kill()
    wait_finished(rig, batch.id, 30)
    return outcome(rig, f"render kills its process {MAX_ATTEMPTS}x", [batch.id], ["victim"], expected_failed=1)


def internal_error(rig: Rig) -> dict:
    batch = rig.farm().submit(specs(1))
    rig.client.set(keys.batch_running(batch.id), "not a hash")  # claiming the job raises in the worker
    rig.worker("unlucky", simulate_s=FAST_S)
    wait_finished(rig, batch.id, 60)
    return outcome(rig, f"internal error on every attempt ({MAX_ATTEMPTS}x handed back)", [batch.id], ["unlucky"],
                   expected_failed=1)


def time_limits(rig: Rig) -> dict:
    farm = rig.farm()
    batch = farm.submit(specs(3))
    set_time_limit(rig.client, batch.id, 0, 1.5, None)
    set_time_limit(rig.client, batch.id, 1, 10, 1)
    rig.worker("timed", simulate_s=4.0)
    wait_finished(rig, batch.id, 60)
    return outcome(rig, "hard 1.5 s and soft 1 s time limits", [batch.id], ["timed"], expected_failed=2)


def redis_restart(rig: Rig) -> dict:
    names = ["w0", "w1"]
    workers = [rig.worker(n, simulate_s=FAST_S) for n in names]
    batch = rig.farm().submit(specs(200, size_px=512))
    wait_for(lambda: rig.ledger.status(batch.id)["done"] >= 50, 60, what="a quarter of the batch")
    rig.redis.kill()
    killed_at = time.monotonic()
    for worker in workers:
        wait_for(lambda: "Connection to broker lost" in worker.output(), 30, what="the workers to notice")
    late: dict = {}
    submitter = threading.Thread(target=lambda: late.update(batch=rig.farm().submit(specs(20, 512, "late"))))
    submitter.start()
    # Down for longer than a registry TTL: every worker looks dead when Redis is back.
    wait_for(lambda: time.monotonic() - killed_at >= REDIS_DOWN_S, REDIS_DOWN_S + 5, interval_s=0.2,
             what="the outage to last")
    rig.redis.start()
    restarted_at = time.monotonic()
    down_s = restarted_at - killed_at
    done_before = rig.ledger.status(batch.id)["done"]
    wait_for(lambda: rig.ledger.status(batch.id)["done"] > done_before, 60, interval_s=0.05,
             what="a job to complete after the restart")
    recovery_s = time.monotonic() - restarted_at
    submitter.join(60)
    wait_finished(rig, batch.id, 120)
    wait_finished(rig, late["batch"].id, 60)
    return outcome(rig, f"Redis kill -9, down {down_s:.1f} s, AOF restart; 200 jobs (+20 queued while down)",
                   [batch.id, late["batch"].id], names, recovery_s=recovery_s)


def storage_outage(rig: Rig) -> dict:
    worker = rig.worker("uploader", simulate_s=0.3, ZFARM_UPLOAD_RETRY_S=60)
    batch = rig.farm().submit(specs(30))
    wait_for(lambda: rig.ledger.status(batch.id)["done"] >= 5, 30, what="jobs done before the outage")
    rig.s3.stop()
    stopped_at = time.monotonic()
    wait_for(lambda: "upload of" in worker.output(), 30, what="an upload to fail")
    wait_for(lambda: time.monotonic() - stopped_at >= 20, 25, interval_s=0.2, what="20 s of outage")
    done_before = rig.ledger.status(batch.id)["done"]
    rig.s3.start()
    back_at = time.monotonic()
    wait_for(lambda: rig.ledger.status(batch.id)["done"] > done_before, 60, interval_s=0.05,
             what="the held upload to land")
    recovery_s = time.monotonic() - back_at
    wait_finished(rig, batch.id, 90)
    return outcome(rig, "S3 down 20 s, uploads retry 60 s", [batch.id], ["uploader"], recovery_s=recovery_s)


def upload_gives_up(rig: Rig) -> dict:
    rig.worker("uploader", simulate_s=0.3, ZFARM_UPLOAD_RETRY_S=1.5)
    batch = rig.farm().submit(specs(10))
    wait_for(lambda: rig.ledger.status(batch.id)["done"] >= 3, 30, what="jobs done before the outage")
    rig.s3.stop()
    wait_for(lambda: rig.ledger.status(batch.id)["failed"] >= 2, 60, what="uploads to give up")
    rig.s3.start()
    failed = wait_finished(rig, batch.id, 60)["failed"]
    retried_at = time.monotonic()
    zfarm_cli(rig, "retry", batch.id, "--failed")
    wait_for(lambda: rig.ledger.status(batch.id)["done"] == 10, 60, what="the retried jobs")
    row = outcome(rig, f"upload gives up after 1.5 s ({failed} failed), retry --failed", [batch.id], ["uploader"],
                  recovery_s=time.monotonic() - retried_at)
    return row


def resubmit(rig: Rig) -> dict:
    prompts = rig.tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a prompt number {i}\n" for i in range(5)))
    batch_ids = {zfarm_cli(rig, "submit", str(prompts), "--idempotency-key", "nightly").stdout.strip()
                 for _ in range(3)}
    batch_ids |= {zfarm_cli(rig, "submit", str(prompts), "--name", "nightly-by-name").stdout.strip()
                  for _ in range(3)}
    rig.worker("only", simulate_s=FAST_S)
    for batch_id in batch_ids:
        wait_finished(rig, batch_id, 60)
    row = outcome(rig, f"submit x3 with one key, x3 with one name ({len(batch_ids)} batches)", sorted(batch_ids),
                  ["only"])
    return row


def malformed(rig: Rig) -> dict:
    farm = rig.farm()
    batch = farm.submit([{"prompt": "a real job", "seed": 1}] * 1000)
    queue = next(q.decode() for q in rig.client.keys("zfarm.*") if rig.client.llen(q))
    good_job = json.loads(rig.client.hget(keys.batch_jobs(batch.id), 0))
    rig.client.delete(queue)
    items = malformed_messages(batch.id, good_job, queue, 1000)
    named = sum(1 for _, index in items if index is not None)
    pipe = rig.client.pipeline()
    for raw, _ in items:
        pipe.lpush(queue, raw)
    pipe.execute()
    worker = rig.worker("sturdy", simulate_s=FAST_S)
    started = time.monotonic()
    wait_for(lambda: rig.client.llen(queue) == 0 and rig.client.hlen(keys.KOMBU_UNACKED) == 0, 180,
             interval_s=0.2, what="every malformed message to be taken")
    drained_s = time.monotonic() - started
    farm.batch(batch.id).cancel()
    after = farm.submit([{"prompt": "a good job after the junk", "seed": 2, "width": 256, "height": 256}])
    wait_finished(rig, after.id, 60)
    status = rig.ledger.status(batch.id)
    rejected = rig.client.llen(keys.REJECTED)
    alive = worker.proc.poll() is None
    renders_after = rig.ledger.status(after.id)["done"] == 1
    return {"scenario": f"1000 malformed messages ({named} name a job; taken in {drained_s:.1f} s; worker "
                        f"alive: {alive}, renders the next job: {renders_after})", "jobs": 1000,
            "done": 0, "failed": status["failed"] + rejected,
            "expected failed": 1000, "cancelled": status["cancelled"],
            "lost": 1000 - status["failed"] - rejected, "stored twice": 0, "same image": True,
            "counted twice": 0, "recovery s": None}


def store_then_die(rig: Rig) -> dict:
    import redis

    doomed = rig.worker("doomed", simulate_s=2.0)
    batch = rig.farm().submit(specs(1))
    claimed_by(rig, batch.id, "doomed")
    rig.worker("rescuer", simulate_s=FAST_S)
    admin = redis.Redis.from_url(rig.redis.url)
    admin.execute_command("CLIENT", "PAUSE", 15000, "WRITE")
    try:
        wait_for(lambda: f"{batch.id}/000000.json" in rig.versions(batch.id), 20, what="the result to be stored")
        doomed.kill_group()
        killed_at = time.monotonic()
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
    wait_done(rig, batch.id, 0, 60)
    return outcome(rig, "worker dies after storing, before recording", [batch.id], ["doomed", "rescuer"],
                   recovery_s=time.monotonic() - killed_at)


def delivered_thrice(rig: Rig) -> dict:
    batch = rig.farm().submit(specs(1))
    queue = next(q for q in rig.client.keys("zfarm.*") if rig.client.llen(q))
    message = rig.client.lindex(queue, 0)
    rig.client.rpush(queue, message, message)
    for name in ("one", "two"):
        rig.worker(name, simulate_s=FAST_S)
    wait_for(lambda: sum(rig.client.llen(q) for q in rig.client.keys("zfarm.*")) == 0
             and rig.client.hlen(keys.KOMBU_UNACKED) == 0, 30, what="every copy to be taken")
    wait_finished(rig, batch.id, 30)
    return outcome(rig, "one job's message delivered 3x", [batch.id], ["one", "two"])


def lost_message(rig: Rig) -> dict:
    batch = rig.farm().submit(specs(5))
    [queue] = [q for q in rig.client.keys("zfarm.*") if rig.client.llen(q)]
    # Job 0's message gone: what a worker, or a Redis, killed between BRPOP and kombu's unacked write leaves.
    rig.client.rpop(queue)
    rig.worker("finder", simulate_s=FAST_S)
    ready_at = time.monotonic()
    wait_done(rig, batch.id, 0, 60)
    recovery_s = time.monotonic() - ready_at
    wait_finished(rig, batch.id, 30)
    return outcome(rig, "a message lost between pop and record (registry TTL 4 s)", [batch.id], ["finder"],
                   recovery_s=recovery_s)


SCENARIOS = {
    "kill": kill_other_worker, "restart": kill_and_restart, "sigterm-short": sigterm_short,
    "sigterm-long": sigterm_long, "poison": poison_job, "internal-error": internal_error,
    "time-limit": time_limits, "redis": redis_restart, "storage": storage_outage,
    "upload-fails": upload_gives_up, "resubmit": resubmit, "malformed": malformed,
    "store-then-die": store_then_die, "duplicate": delivered_thrice, "lost-message": lost_message,
}


def print_table(rows: list[dict]) -> None:
    cells = [[("-" if row.get(c) is None else str(row.get(c))) for c in COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    sys.stdout.flush()


def main(argv=None) -> int:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="run only these scenarios")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    rows = []
    for key in args.only or list(SCENARIOS):
        workdir = Path(tempfile.mkdtemp(prefix=f"zfarm-resilience-{key}-"))
        rig = Rig(workdir, appendonly=(key == "redis"))
        started = time.monotonic()
        failed = True
        try:
            row = SCENARIOS[key](rig)
            failed = False
        finally:
            rig.close(failed=failed)
        row["scenario s"] = round(time.monotonic() - started, 1)
        rows.append(row)
        print(f"\n== {key} ({row['scenario s']} s)")
        print_table([row])
    print("\n== all scenarios")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    problems = [r["scenario"] for r in rows
                if r["lost"] or r["counted twice"] or not r["same image"] or r["failed"] != r["expected failed"]]
    if problems:
        print(f"\nNOT OK: {problems}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
