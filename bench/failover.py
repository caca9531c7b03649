"""Redis failover through Sentinel: the primary killed mid-batch, what it cost.

    python bench/failover.py                                # 3 runs, 4 workers, sentinels' down-after 1 s
    python bench/failover.py --runs 2 --down-after-ms 5000 --workers 8 --json bench/results/failover.json

Each run is the scenario of tests/test_sentinel.py on a fresh farm: Debian's redis-server as primary
and replica (AOF, a password), three sentinels (`redis-server FILE --sentinel`, quorum 2), moto's S3
server with a versioned bucket, `python -m worker --simulate S` subprocesses and Flower, all given
the `sentinel://` form of ZFARM_REDIS_URL. A batch is submitted, the primary is killed with SIGKILL
once some jobs are done, and a producer submits a second batch at that moment. Printed per run:

- promoted s: from the kill until a sentinel names the replica as primary.
- accepted s: from the kill until the second batch's submit returned (it retried through the failover).
- lost: jobs not final at the end, or done without both their PNG and sidecar stored.
- stored twice: PNGs written more than once (S3 versions), and whether every version has the same bytes.
- counted twice: renders counted more than once (the workers' jobs_done summed, less the ledger's done).
- without progress s: between the last job the ledger recorded done before the kill and the first
  one after (sampled every 50 ms through Sentinel).
- written s: from the kill to the first result written to S3 after it (the sidecars' own time):
  rendering and storing go on while Redis is away; recording waits for the promotion.
- restarted: workers that exited or registered again as a new instance (none should).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

for _name, _value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                      "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_name, _value)  # moto takes any credentials; boto3 wants some

from test_sentinel import SentinelRig, failover  # noqa: E402  (tests/test_sentinel.py)

COLUMNS = (("run", "run"), ("workers", "workers"), ("jobs", "jobs"), ("done", "done"), ("lost", "lost"),
           ("stored_twice", "stored twice"), ("same_bytes", "same bytes"), ("counted_twice", "counted twice"),
           ("promoted_after_s", "promoted s"), ("second_batch_accepted_after_s", "accepted s"),
           ("seconds_without_progress", "without progress s"), ("first_result_written_after_kill_s", "written s"),
           ("workers_restarted", "restarted"))


def main(argv=None) -> int:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=240, help="jobs of the first batch (the second has a sixth)")
    ap.add_argument("--down-after-ms", type=int, default=1000,
                    help="the sentinels' down-after-milliseconds (docker-compose.yml uses 5000)")
    ap.add_argument("--json", help="also write the runs to this file")
    args = ap.parse_args(argv)
    rows = []
    for run in range(1, args.runs + 1):
        tmp = Path(tempfile.mkdtemp(prefix="zfarm-failover-"))
        rig = SentinelRig(tmp, down_after_ms=args.down_after_ms)
        failed = True
        try:
            row = failover(rig, workers=args.workers, first=args.jobs, second=max(1, args.jobs // 6),
                           kill_after_done=args.jobs // 6)
            failed = False
        finally:
            rig.close(failed=failed)
            if not failed:
                shutil.rmtree(tmp, ignore_errors=True)  # kept, with the worker logs, when the run broke
        row.update(run=run, down_after_ms=args.down_after_ms, at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpus": os.cpu_count(), "runs": rows}, indent=1) + "\n")
    bad = [r["run"] for r in rows if r["lost"] or r["counted_twice"] or not r["same_bytes"] or r["workers_restarted"]]
    if bad:
        print(f"NOT OK: runs {bad}", file=sys.stderr)
        return 1
    return 0


def print_table(rows: list[dict]) -> None:
    cells = [[str(row.get(key, "-")) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(title), *(len(r[i]) for r in cells)) for i, (_, title) in enumerate(COLUMNS)]
    print("  ".join(title.ljust(w) for (_, title), w in zip(COLUMNS, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


if __name__ == "__main__":
    sys.exit(main())
