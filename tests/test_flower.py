"""Flower against the test Redis and a live worker: the worker page shows its card, class and profile."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from farm import REPO, base_env, free_port, wait_for
from farm_fixtures import TEST_TABLE

ARTIFACTS = REPO / "test-artifacts"
USER, PASSWORD = "admin", "s3cret-for-tests"


def _get(url: str, auth: bool = True):
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read()


@pytest.fixture
def flower(redis_server, tmp_path):
    port = free_port()
    env = base_env(redis_server, f"file://{tmp_path / 'results'}", ZFARM_PROFILE_TABLE=str(TEST_TABLE))
    log = open(tmp_path / "flower.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.flower_app", "flower",
                             f"--port={port}", "--address=127.0.0.1", f"--basic-auth={USER}:{PASSWORD}"],
                            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def up():
        try:
            return _get(f"http://127.0.0.1:{port}/healthcheck", auth=False)[0] == 200
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "flower.log").read_text())
            return False

    wait_for(up, 60, interval_s=0.2, what="Flower to answer")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(20)
    log.close()


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed: the README's test command installs it"
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                           f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1000",
                           "--virtual-time-budget=5000", *args], capture_output=True, timeout=120)


def test_flower_requires_a_password(flower):
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(f"{flower}/api/workers", auth=False)
    assert err.value.code == 401


def test_flower_switches_on_task_events_and_lists_rendered_jobs(flower, start_worker, farm_factory,
                                                               file_storage_url):
    start_worker(file_storage_url, ("--simulate", "0.05"))
    farm = farm_factory(file_storage_url)

    def listed():
        # Workers send no task events until Flower asks (its enable_events): submit until it has.
        farm.submit(["a job Flower should see"])
        _status, body = _get(f"{flower}/api/tasks")
        return [t for t in json.loads(body).values() if t.get("name") == "zfarm.render"]

    tasks = wait_for(listed, 60, interval_s=1.0, what="Flower to list a rendered job")
    assert tasks[0]["state"] in ("RECEIVED", "STARTED", "SUCCESS")


def test_flower_shows_the_worker_class_and_profile_and_every_queue(flower, start_worker, file_storage_url, tmp_path):
    # A 12 GB worker: it does not serve the large-job tier, whose queues Flower must list all the same.
    worker = start_worker(file_storage_url, ("--simulate", "0.05", "--vram-gb", "12"))
    name = worker.registration["name"]

    def listed():
        status, body = _get(f"{flower}/api/workers?refresh=1")
        workers = json.loads(body)
        return workers.get(name) if status == 200 and workers.get(name, {}).get("stats") else None

    info = wait_for(listed, 60, interval_s=0.5, what="Flower to list the worker")
    zfarm = info["stats"]["zfarm"]
    assert zfarm["vram_class"] == 12 and zfarm["profile"] == "te_stream_fp8" and zfarm["gpu"] == "cpu"

    page_url = f"http://{USER}:{PASSWORD}@{flower.split('://')[1]}/worker/{name}"
    dom = _chromium(["--dump-dom", page_url], tmp_path).stdout.decode(errors="replace")
    assert name in dom and "vram_class" in dom and "te_stream_fp8" in dom
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "flower-worker-page.png"
    # The "Other" tab holds the worker's own stats (our boot step's info): open the page on it.
    _chromium([f"--screenshot={shot}", page_url + "#tab-other"], tmp_path)
    assert shot.exists() and shot.stat().st_size > 10_000

    try:
        _status, body = _get(f"{flower}/api/queues/length")
    except urllib.error.HTTPError as exc:
        raise AssertionError(exc.read()[:500]) from exc
    names = {q["name"] for q in json.loads(body)["active_queues"]}
    assert not any(".c24." in q["name"] for q in info.get("active_queues", []))
    assert {"zfarm.high.c24.0", "zfarm.normal.c24.3", "zfarm.normal.any.0", "zfarm.low.any.3"} <= names
