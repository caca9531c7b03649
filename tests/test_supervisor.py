"""Multi-GPU boxes: `zfarm worker --gpus` runs one worker per card (NVML faked at its boundary)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import redis

from farm import REPO, base_env, wait_for
from farm_fixtures import TEST_TABLE
from shared import registry
from worker.engine import detect
from worker.supervisor import GpuSpecError, Slot, parse_gpus, slot_name

CARDS = [{"name": "NVIDIA GeForce RTX 4090", "total_gib": 23.99, "cc": "8.9"},
         {"name": "NVIDIA H100 80GB HBM3", "total_gib": 79.19, "cc": "9.0"}]
GPUS = [detect.GpuInfo(c["name"], c["total_gib"], c["cc"]) for c in CARDS]


def test_gpu_specs_name_cards_and_the_class_each_plays():
    assert [(s.gpu_index, s.vram_gb) for s in parse_gpus("all", GPUS)] == [(0, None), (1, None)]
    assert [(s.gpu_index, s.vram_gb) for s in parse_gpus("0:80, 1:12", GPUS)] == [(0, 80.0), (1, 12.0)]
    assert slot_name(Slot(1, 12.0), GPUS[1], "box") == "zimage-12g-gpu1@box"
    assert slot_name(Slot(0, None), GPUS[0], "box") == "zimage-24g-gpu0@box"


@pytest.mark.parametrize("spec, message", [("2", "does not exist"), ("0,0", "named twice"), ("x", "not a card"),
                                           ("0:big", "not a number"), ("", "names no card")])
def test_bad_gpu_specs_are_refused_with_the_reason(spec, message):
    with pytest.raises(GpuSpecError, match=message):
        parse_gpus(spec, GPUS)


def test_gpus_all_on_a_machine_without_gpus_is_refused():
    with pytest.raises(GpuSpecError, match="sees no GPU"):
        parse_gpus("all", [])


def _live(client):
    return {w["name"]: w for w in registry.live_workers(client) if w.get("state") == "ready"}


def test_a_supervisor_runs_one_worker_per_card_restarts_a_crashed_one_and_stops_them_all(redis_server, tmp_path):
    env = base_env(redis_server, f"file://{tmp_path / 'results'}", ZFARM_PROFILE_TABLE=str(TEST_TABLE),
                   FAKE_NVML_GPUS=json.dumps(CARDS))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests" / "fake_nvml"), env["PYTHONPATH"]])
    log_path = tmp_path / "supervisor.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "worker", "--gpus", "0,1:12", "--simulate", "0.05"],
                                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = redis.Redis.from_url(redis_server)
    try:
        live = wait_for(lambda: (lambda w: w if len(w) == 2 else None)(_live(client)), 60, what="two workers")
        by_gpu = {w["name"].split("-gpu")[1][0]: w for w in live.values()}
        assert by_gpu["0"]["gpu"] == "NVIDIA GeForce RTX 4090" and by_gpu["0"]["vram_class"] == 24
        assert by_gpu["1"]["gpu"] == "NVIDIA H100 80GB HBM3" and by_gpu["1"]["vram_class"] == 12
        assert by_gpu["0"]["name"] != by_gpu["1"]["name"]

        crashed, other = by_gpu["1"], by_gpu["0"]
        os.kill(crashed["pid"], signal.SIGKILL)

        def restarted():
            now = _live(client)
            entry = now.get(crashed["name"])
            return now if entry and entry["pid"] != crashed["pid"] else None

        now = wait_for(restarted, 60, what="the crashed card's worker to come back")
        assert now[other["name"]]["pid"] == other["pid"]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert registry.live_workers(client) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        client.close()
    assert "restarting in" in log_path.read_text()
