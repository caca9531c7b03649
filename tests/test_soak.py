"""The churn soak's short version (`bench/soak.py --short`): workers joining, killed with SIGKILL and
signalled with SIGTERM while batches of several producers and priorities run, Redis killed and
restarted from its AOF, S3 down for seconds. Real processes throughout; about 40 s.

The full soak (64+ workers, 10 minutes) is a benchmark, run by hand: its figures are in
bench/results/ and docs/capacity.md.
"""
from __future__ import annotations

import json
import subprocess
import sys

from farm import REPO


def test_a_short_churn_soak_stores_every_job_once_or_again_with_identical_bytes_and_loses_none(tmp_path):
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--short", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())

    assert summary["submitted"] > 50 and summary["batches"] >= 2
    assert summary["lost"] == 0 and summary["failed"] == 0
    assert summary["stored_twice_differing"] == 0
    assert summary["stored_once"] + summary["stored_twice_same"] == summary["submitted"]
    assert all(summary["events"][kind] >= 1 for kind in ("join", "kill", "sigterm", "redis-kill", "s3-down"))
    assert {p for p in summary["submit_to_stored_s"]["by_priority"]} >= {"high", "normal"}
