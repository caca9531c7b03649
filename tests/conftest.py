"""Shared fixtures: real services on free ports, started once per session, reset between tests."""
from __future__ import annotations

import os

import pytest
import redis

import farm

# Worker, S3 and Flower fixtures live beside this file.
pytest_plugins = ("farm_fixtures",)


@pytest.fixture
def free_port() -> int:
    """A TCP port nothing listens on right now."""
    return farm.free_port()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """Tests see no ZFARM_* setting (nor a profile table) from the shell that runs them."""
    for name in list(os.environ):
        if name.startswith("ZFARM_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny random-weight ZImagePipeline (it renders noise), built once per session."""
    from worker.engine import tiny

    folder = tmp_path_factory.mktemp("tiny-zimage")
    tiny.build_tiny(folder)
    return folder


@pytest.fixture(scope="session")
def hostile_dir(tmp_path_factory):
    """The tiny hostile model (worker.engine.hostile): MLP inputs of ~6.6e4 and all-zero rows, built once."""
    from worker.engine import hostile

    folder = tmp_path_factory.mktemp("hostile-zimage")
    hostile.build(folder)
    return folder


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """URL of a real redis-server for this session (no persistence). Flushed before each test that uses it."""
    server = farm.RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


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
