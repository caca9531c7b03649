"""What Celery users type by habit works against a zfarm worker: `celery -A worker.app inspect ...`,
`celery -A worker.app status`, and Flower started on the plain app. The worker's replies come back
through the `<uuid>.reply.celery.pidbox` queues, which the hardened transport leaves to kombu's stock
path (only zfarm's own queues are checked), so no reply is dropped and nothing lands in zfarm:rejected."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from farm import REPO, base_env, free_port, wait_for
from farm_fixtures import TEST_TABLE
from shared import keys

SIMULATE = ("--simulate", "0.05")
USER, PASSWORD = "admin", "s3cret-for-tests"


def celery(redis_url: str, storage_url: str, *args: str) -> subprocess.CompletedProcess:
    env = base_env(redis_url, storage_url, ZFARM_PROFILE_TABLE=str(TEST_TABLE))
    return subprocess.run([sys.executable, "-m", "celery", "-A", "worker.app", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_celery_inspect_ping_stats_active_queues_and_status_get_the_workers_reply(
        start_worker, redis_server, file_storage_url, redis_client):
    worker = start_worker(file_storage_url, (*SIMULATE, "--vram-gb", "12"))
    name = worker.registration["name"]

    # At once: each command is a fresh `celery` process. Naming the destination lets inspect return as soon
    # as the worker replied, instead of waiting out its timeout for others.
    commands = {"ping": ("inspect", "ping", "-d", name, "--timeout", "10", "--json"),
                "stats": ("inspect", "stats", "-d", name, "--timeout", "10", "--json"),
                "queues": ("inspect", "active_queues", "-d", name, "--timeout", "10", "--json"),
                "status": ("status", "--timeout", "10")}
    with ThreadPoolExecutor(len(commands)) as pool:
        done = dict(zip(commands, pool.map(lambda args: celery(redis_server, file_storage_url, *args),
                                           commands.values())))
    ping, stats, queues, status = done["ping"], done["stats"], done["queues"], done["status"]

    assert ping.returncode == 0, ping.stderr
    assert json.loads(ping.stdout) == {name: {"ok": "pong"}}

    assert stats.returncode == 0, stats.stderr
    zfarm = json.loads(stats.stdout)[name]["zfarm"]
    assert zfarm["vram_class"] == 12 and zfarm["profile"] == "te_stream_fp8" and zfarm["ready"] is True

    assert queues.returncode == 0, queues.stderr
    consumed = {q["name"] for q in json.loads(queues.stdout)[name]}
    assert {"zfarm.high.any.0", "zfarm.normal.any.3", "zfarm.low.any.0"} <= consumed

    assert status.returncode == 0 and f"{name}: OK" in status.stdout and "1 node online" in status.stdout

    assert "dropped a queue item" not in ping.stderr + stats.stderr + queues.stderr + status.stderr
    assert redis_client.llen(keys.REJECTED) == 0


def _get(url: str):
    request = urllib.request.Request(url)
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())


@pytest.fixture
def flower_on_the_plain_app(redis_server, tmp_path):
    """`celery -A worker.app flower`, as a Celery user starts it by habit."""
    port = free_port()
    env = base_env(redis_server, f"file://{tmp_path / 'results'}", ZFARM_PROFILE_TABLE=str(TEST_TABLE))
    log = open(tmp_path / "flower.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.app", "flower", f"--port={port}",
                             "--address=127.0.0.1", f"--basic-auth={USER}:{PASSWORD}"],
                            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def up():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=5).status == 200
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "flower.log").read_text())
            return False

    wait_for(up, 60, interval_s=0.2, what="Flower to answer")
    yield f"http://127.0.0.1:{port}", tmp_path / "flower.log"
    proc.terminate()
    proc.wait(20)
    log.close()


def test_flower_on_the_plain_app_lists_the_worker_with_its_stats_and_rejects_nothing(
        flower_on_the_plain_app, start_worker, file_storage_url, redis_client):
    url, log_path = flower_on_the_plain_app
    worker = start_worker(file_storage_url, SIMULATE)
    name = worker.registration["name"]

    def listed():
        status, workers = _get(f"{url}/api/workers?refresh=1")
        return workers.get(name) if status == 200 and workers.get(name, {}).get("stats") else None

    info = wait_for(listed, 60, interval_s=0.5, what="Flower to list the worker with its stats")
    assert info["stats"]["zfarm"]["gpu"] == "cpu" and info["stats"]["zfarm"]["ready"] is True
    assert any(q["name"].startswith("zfarm.") for q in info["active_queues"])
    assert "dropped a queue item" not in log_path.read_text(errors="replace")
    assert redis_client.llen(keys.REJECTED) == 0
