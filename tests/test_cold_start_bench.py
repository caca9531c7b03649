"""bench/cold_start.py end to end on the CPU: its own redis-server, a real `zfarm worker` on the tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image

from farm import REPO
from farm_fixtures import TEST_TABLE


def test_the_cold_start_benchmark_times_a_worker_that_takes_its_job_only_once_ready(tmp_path, tiny_dir):
    model = tiny_dir
    jsonl, keep = tmp_path / "cold_start.jsonl", tmp_path / "kept"
    env = dict(os.environ, ZFARM_PROFILE_TABLE=str(TEST_TABLE), ZFARM_DEVICE="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "bench.cold_start", str(model), "--runs", "1", "--fresh-cache",
                           "--compile-cache-dir", str(tmp_path / "compile"), "--size", "256", "--timeout-s", "90",
                           "--jsonl", str(jsonl), "--keep", str(keep)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]

    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert record == json.loads(proc.stdout.strip())
    assert record["ok"] and record["error"] is None
    assert record["cache"] == "empty" and record["device"] == "cpu" and record["profile"] == "cpu"
    assert 0 < record["to_loading_s"] < record["to_ready_s"] <= record["to_first_image_s"]
    assert record["claimed_before_ready"] is False
    assert record["render_s"] > 0 and record["load_s"] > 0
    with Image.open(record["kept_png"]) as image:
        assert image.size == (256, 256)
        assert "parameters" in image.text
