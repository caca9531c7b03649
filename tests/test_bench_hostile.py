"""bench/hostile.py on the CPU: the tiny model made hostile in each process, its reference rendered in
float32, the naive per-tensor recipe failing the gate and stepping down through safer policies, the
shipped row-wise recipe passing, every record in the JSONL file. The GPU run is the same on the full model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from farm import REPO
from worker.engine import hostile, tiny


def test_on_the_hostile_model_the_naive_recipe_fails_and_steps_down_and_the_shipped_recipe_passes(tmp_path):
    model = tmp_path / "tiny6"
    tiny.build_tiny(model, n_layers=hostile.TINY_LAYERS, **hostile.TINY_DIT)   # made hostile by the benchmark
    jsonl = tmp_path / "hostile.jsonl"
    done = subprocess.run([sys.executable, "-m", "bench.hostile", str(model), "--device", "cpu", "--probes", "1",
                           "--size", "256", "--steps", "8", "--jsonl", str(jsonl), "--images-dir",
                           str(tmp_path / "images")], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    [reference] = [r for r in records if r["check"] == "hostile-run" and r["item"] == "cpu"]
    assert 0.9 * hostile.PEAK <= reference["linear_inputs"]["mlp_input_max_abs"] <= 1.1 * hostile.PEAK
    assert reference["linear_inputs"]["zero_rows"] > 0
    verdicts = {(r["profile"], r["policy"]): r for r in records if r["check"] == "hostile"}
    assert [key for key in verdicts] == [("cpu_fp8", "blocks"), ("cpu_fp8_naive", "blocks"),
                                         ("cpu_fp8_naive", "edges"), ("cpu_fp8_naive", "half")]
    assert [v["passed"] for v in verdicts.values()] == [True, False, False, False]
    assert verdicts[("cpu_fp8", "blocks")]["psnr_db_min"] > verdicts[("cpu_fp8_naive", "blocks")]["psnr_db_min"] + 10
    assert all(v["s_per_image"] > 0 and v["scaling"] in ("rowwise", "tensor") for v in verdicts.values())
    lines = [line for line in done.stdout.splitlines() if line.startswith("cpu_fp8")]
    assert len(lines) == 4 and lines[0].endswith("passed") and all(line.endswith("FAILED") for line in lines[1:])


def test_the_gpu_run_covers_every_lossy_profile_the_chooser_picks_on_any_architecture_then_the_naive_recipe():
    from bench import hostile as bench_hostile
    from shared import archs, profiles

    items = bench_hostile.default_items("cuda", "2.11.0", "3.6.0")
    table = profiles.load_table()
    lossy = {r["profile"] for r in table["runs"] if r.get("lossy")}
    picked = {row["profile"] for arch in archs.ARCHS for ram_gib in bench_hostile.HOST_RAM_GIB
              for row in profiles.class_table(table, ram_gib=ram_gib, caps=archs.capabilities(arch, "2.11.0", "3.6.0"))
              if row.get("profile") in lossy}
    assert set(items[:-1]) == picked and len(items) == len(picked) + 1
    assert {"fp8mm_fast_qk_compiled", "int8mm_fast_compiled", "int8mm_fast_te_stream_pinned_compiled"} <= picked
    assert items[0] == "fp8mm_fast_qk_compiled" and items[-1] == bench_hostile.NAIVE["cuda"]
