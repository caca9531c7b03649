"""Fixtures that start real farm processes: moto's S3 server and zfarm worker subprocesses."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis

from farm import S3Server, WorkerProcess, base_env, s3_env, wait_for
from shared import registry

TEST_TABLE = Path(__file__).parent / "data" / "profile_table.json"
WORKER_READY_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def s3_server():
    import os

    # The producer side reads credentials the standard way; moto accepts any.
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    server = S3Server().start()
    server.client().create_bucket(Bucket=server.bucket)
    yield server
    server.stop()


@pytest.fixture
def s3_storage_url(s3_server) -> str:
    """A fresh prefix in the test bucket for each test."""
    return f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def file_storage_url(tmp_path) -> str:
    return f"file://{tmp_path / 'results'}"


@pytest.fixture
def start_worker(redis_server, tmp_path, request):
    """Factory: start a `python -m worker` subprocess and wait until it is registered and ready."""
    started: list[WorkerProcess] = []
    client = redis.Redis.from_url(redis_server)

    def start(storage_url: str, args=(), wait_ready: bool = True, s3: S3Server | None = None, **env_extra):
        extra = {"ZFARM_PROFILE_TABLE": str(TEST_TABLE), **(s3_env(s3) if s3 else {}), **env_extra}
        env = base_env(redis_server, storage_url, **extra)
        log_path = tmp_path / f"worker-{len(started)}.log"
        proc = WorkerProcess(env, list(args), log_path).start()
        started.append(proc)
        if wait_ready:
            def ready():
                if proc.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.proc.returncode}:\n{proc.output()[-3000:]}")
                return [w for w in registry.live_workers(client)
                        if w.get("pid") == proc.proc.pid and w.get("state") == "ready"]
            proc.registration = wait_for(ready, WORKER_READY_TIMEOUT_S, what="the worker to be ready")[0]
        return proc

    yield start
    for proc in started:
        proc.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for proc in started:
            print(f"--- {proc.log_path.name} ---\n{proc.output()[-4000:]}")
    client.close()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


@pytest.fixture
def farm_factory(redis_server):
    """Producer-side Farm for a given storage URL (and S3 endpoint)."""
    from producer.api import Farm
    from shared import profiles

    def make(storage_url: str, s3: S3Server | None = None):
        overrides = {"redis_url": redis_server, "storage_url": storage_url}
        if s3 is not None:
            overrides["s3_endpoint_url"] = s3.endpoint_url
        return Farm.from_env(table=profiles.load_table(TEST_TABLE), **overrides)

    return make
