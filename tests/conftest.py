"""Shared fixtures: real services on free ports, started once per session, reset between tests."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest
import redis

# Worker, S3 and Flower fixtures live beside this file.
pytest_plugins = ("farm_fixtures",)

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
SERVICE_START_TIMEOUT_S = 15.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A TCP port nothing listens on right now."""
    return _free_port()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """Tests see no ZFARM_* setting (nor a profile table) from the shell that runs them."""
    for name in list(os.environ):
        if name.startswith("ZFARM_"):
            monkeypatch.delenv(name)


def _wait_for_redis(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}: {process.stderr.read().decode()}")
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            client.close()


@pytest.fixture(scope="session")
def redis_server():
    """URL of a real redis-server for this session (no persistence). Flushed before each test that uses it."""
    port = _free_port()
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for_redis(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(autouse=True)
def _flush_redis(request):
    """Each test that uses `redis_server` starts from an empty database and fresh command stats."""
    if "redis_server" not in request.fixturenames:
        return
    client = redis.Redis.from_url(request.getfixturevalue("redis_server"))
    client.flushall()
    client.config_resetstat()
    client.close()


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server)
    yield client
    client.close()
