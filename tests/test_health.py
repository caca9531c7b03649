"""`python -m worker.health`: the container health check reads the worker's registry entry."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from shared import registry
from shared.redis_conn import connect
from shared.settings import Settings
from worker import health

REPO = Path(__file__).resolve().parents[1]


def settings(redis_url: str, name: str = "") -> Settings:
    return Settings(redis_url=redis_url, worker_name=name)


def test_a_registered_worker_is_healthy(redis_server, tmp_path):
    registry.register(connect(redis_server), {"name": "gpu0@box"}, ttl_s=30)
    assert health.check(settings(redis_server, "gpu0@box"), tmp_path / "none") == (True, "gpu0@box: registered")


def test_a_name_without_host_is_completed_with_this_host_as_the_worker_does(redis_server, tmp_path):
    full_name = f"gpu0@{socket.gethostname()}"
    registry.register(connect(redis_server), {"name": full_name}, ttl_s=30)
    assert health.check(settings(redis_server, "gpu0"), tmp_path / "none") == (True, f"{full_name}: registered")


def test_a_worker_whose_entry_expired_is_unhealthy(redis_server, tmp_path):
    healthy, message = health.check(settings(redis_server, "gone@box"), tmp_path / "none")
    assert not healthy and "not registered" in message


def test_the_name_the_worker_wrote_at_boot_comes_first(redis_server, tmp_path):
    name_file = tmp_path / "zfarm-worker-name"
    name_file.write_text("zimage-24g@box")  # what worker.startup writes
    registry.register(connect(redis_server), {"name": "zimage-24g@box"}, ttl_s=30)
    assert health.check(settings(redis_server), name_file) == (True, "zimage-24g@box: registered")
    assert health.check(settings(redis_server, "other"), name_file) == (True, "zimage-24g@box: registered")


def test_no_name_at_all_is_unhealthy_and_says_why(tmp_path):
    healthy, message = health.check(settings("redis://127.0.0.1:1/0"), tmp_path / "none")
    assert not healthy and "ZFARM_WORKER_NAME" in message


def test_unreachable_redis_exits_1_without_printing_the_password(free_port):
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port}/0"
    env = {**os.environ, "ZFARM_REDIS_URL": url, "ZFARM_WORKER_NAME": "gpu0-box", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "worker.health"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "Redis unreachable" in done.stdout
    assert "s3cret-pw" not in done.stdout + done.stderr
