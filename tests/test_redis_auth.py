"""A refused Redis password is a configuration error: the worker stops with exit 78 and says so, and
a zfarm command gives up at once. Only a lost connection is retried. A real redis-server with
requirepass, real worker subprocesses."""
from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from farm import RedisServer, WorkerProcess, base_env, wait_for
from farm_fixtures import TEST_TABLE
from producer.cli import main
from shared import registry

PASSWORD = "right-password"
SIMULATE = ("--simulate", "0.05")


@pytest.fixture
def guarded_redis(tmp_path):
    server = RedisServer(tmp_path / "redis", password=PASSWORD).start()
    yield server
    server.stop()


@pytest.fixture
def run_worker(tmp_path):
    started = []

    def run(redis_url: str) -> WorkerProcess:
        env = base_env(redis_url, f"file://{tmp_path / 'results'}", ZFARM_PROFILE_TABLE=str(TEST_TABLE))
        proc = WorkerProcess(env, list(SIMULATE), tmp_path / f"worker-{len(started)}.log").start()
        started.append(proc)
        return proc

    yield run
    for proc in started:
        proc.stop()
        print(f"--- {proc.log_path.name} ---\n{proc.output()[-3000:]}")  # shown when a test fails


def url_with(server: RedisServer, auth: str) -> str:
    return f"redis://{auth}127.0.0.1:{server.port}/0"


@pytest.mark.parametrize("auth, says", [
    (":wrong-password@", "authentication failed: Redis at redis://:***@127.0.0.1:{port}/0 refused the user name "
                         "and password of ZFARM_REDIS_URL"),
    ("", "authentication required: Redis at redis://127.0.0.1:{port}/0 needs a password and ZFARM_REDIS_URL "
         "gives none"),
])
def test_a_worker_refused_by_redis_stops_with_exit_78_and_says_why(guarded_redis, run_worker, auth, says):
    worker = run_worker(url_with(guarded_redis, auth))
    assert worker.proc.wait(60) == 78
    out = worker.output()
    assert says.format(port=guarded_redis.port) in out
    assert "Trying again" not in out and "HELLO" not in out and "wrong-password" not in out


def test_a_worker_whose_password_is_changed_under_it_stops_with_exit_78(guarded_redis, run_worker):
    worker = run_worker(guarded_redis.url)
    client = guarded_redis.client()
    wait_for(lambda: [w for w in registry.live_workers(client) if w.get("state") == "ready"], 60,
             what="the worker to be ready")
    client.config_set("requirepass", "rotated-password")
    client.client_kill_filter(_type="normal", skipme=True)  # the worker reconnects with its old password
    assert worker.proc.wait(60) == 78
    out = worker.output()
    assert "zfarm worker stops: authentication failed" in out and "Trying again" not in out


def test_a_worker_whose_redis_drops_its_connections_at_start_keeps_trying_and_registers_once_redis_is_up(
        tmp_path, run_worker):
    server = RedisServer(tmp_path / "late-redis", password=PASSWORD)  # not started yet
    # Until Redis starts, its port hangs up on every connection: a connection loss, not a refusal.
    listener = socket.create_server(("127.0.0.1", server.port))
    attempts = []

    def hang_up():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # the listener was closed
            attempts.append(1)
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    worker = run_worker(server.url)
    try:
        wait_for(lambda: len(attempts) >= 2, 60, what="the worker to try Redis twice")
        assert worker.proc.poll() is None
    finally:
        listener.close()
    server.start()
    try:
        client = server.client()
        wait_for(lambda: registry.live_workers(client), 90, what="the worker to register once Redis is up")
        worker.signal(signal.SIGTERM)
        assert worker.proc.wait(60) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("auth, says", [(":wrong-password@", "authentication failed"),
                                        ("", "authentication required")])
def test_a_zfarm_command_refused_by_redis_gives_up_at_once_with_a_clear_message(guarded_redis, capsys, auth, says):
    started = time.monotonic()
    code = main(["--redis-url", url_with(guarded_redis, auth), "status", "20240101-000000-abcdef"])
    err = capsys.readouterr().err
    assert code == 3 and time.monotonic() - started < 5
    assert err.startswith(f"zfarm: {says}") and len(err.splitlines()) == 1
    assert "retrying" not in err and "HELLO" not in err and "wrong-password" not in err
