"""Submit benchmark: `zfarm submit` of a generated N-line JSONL file into a real Redis.

Prints the wall time of the whole command (interpreter start included) and the producer's peak RSS,
read from the kernel's rusage of that one process. Target: 10,000 jobs in <= 5 s on a 2-core machine.

    python bench/submit_bench.py                      # starts redis-server on a free port
    python bench/submit_bench.py --jobs 10000 --runs 3 --redis-url redis://host:6379/15
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 5.0
WORDS = "a the cat dog city neon light river mountain painting portrait photo night sunset forest".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jobs(path: Path, n: int) -> None:
    rng = random.Random(0)
    sizes = [(512, 512), (768, 768), (1024, 1024), (1024, 768)]
    with path.open("w") as f:
        for i in range(n):
            width, height = rng.choice(sizes)
            job = {"prompt": " ".join(rng.choice(WORDS) for _ in range(12)) + f" #{i}",
                   "width": width, "height": height, "steps": rng.choice([4, 8]), "seed": i}
            f.write(json.dumps(job) + "\n")


def start_redis(workdir: Path):
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on PATH; pass --redis-url")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.05)


def submit_once(redis_url: str, jobs_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, "-m", "producer.cli", "--redis-url", redis_url, "submit", str(jobs_path), "--json"]
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait4 gives this one process's rusage: ru_maxrss is its peak RSS (KiB on Linux).
    _, wait_status, usage = os.wait4(proc.pid, 0)
    wall_s = time.perf_counter() - started
    out, err = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(wait_status)
    if code != 0:
        raise SystemExit(f"submit failed ({code}): {err.decode()}")
    result = json.loads(out)
    return {"batch_id": result["batch_id"], "jobs": result["jobs"], "wall_s": round(wall_s, 3),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--redis-url", help="use this Redis (its database is flushed!) instead of starting one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="zfarm-bench-") as tmp:
        tmp = Path(tmp)
        jobs_path = tmp / "jobs.jsonl"
        write_jobs(jobs_path, args.jobs)
        server, url = (None, args.redis_url) if args.redis_url else start_redis(tmp)
        client = redis.Redis.from_url(url)
        try:
            runs = []
            for _ in range(args.runs):
                client.flushdb()
                run = submit_once(url, jobs_path)
                queued = sum(client.llen(q) for q in client.keys("zfarm.*"))
                if queued != args.jobs:
                    raise SystemExit(f"expected {args.jobs} queued messages, found {queued}")
                runs.append(run)
                print(f"submit of {args.jobs} jobs: {run['wall_s']:.2f} s wall, {run['cpu_s']:.2f} s CPU, "
                      f"peak RSS {run['peak_rss_mib']:.0f} MiB", file=sys.stderr)
        finally:
            client.close()
            if server is not None:
                server.terminate()
                server.wait(10)
    best = min(runs, key=lambda r: r["wall_s"])
    summary = {"jobs": args.jobs, "runs": runs, "best_wall_s": best["wall_s"],
               "median_wall_s": sorted(r["wall_s"] for r in runs)[len(runs) // 2],
               "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "cpus": os.cpu_count(),
               "target_s": TARGET_S}
    print(json.dumps(summary))
    return 0 if summary["median_wall_s"] <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
