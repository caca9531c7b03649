"""Producers ride out a Redis restart: a `zfarm` command retries with backoff for
ZFARM_PRODUCER_REDIS_RETRY_S (60 s by default), says that it waits, then goes on or gives up (exit 3).
Real redis-server processes, killed and restarted on the same port; real `zfarm` subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from farm import REPO, RedisServer, free_port, wait_for
from farm_fixtures import TEST_TABLE
from producer.cli import main
from shared import keys
from shared.settings import Settings

OUTAGE_S = 31.0


def zfarm(redis_url: str, args: list[str], stderr_path, **env_extra) -> subprocess.Popen:
    env = dict(os.environ, ZFARM_PROFILE_TABLE=str(TEST_TABLE), PYTHONPATH=str(REPO), ZFARM_REDIS_URL=redis_url,
               **env_extra)
    return subprocess.Popen([sys.executable, "-m", "producer.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=open(stderr_path, "wb"))


def test_the_default_retry_covers_a_restart_of_at_least_30_s():
    assert Settings.from_env({}).producer_redis_retry_s >= 30
    assert Settings.from_env({"ZFARM_PRODUCER_REDIS_RETRY_S": "5"}).producer_redis_retry_s == 5


def test_zfarm_submit_started_during_a_31_s_redis_outage_waits_for_it_and_queues_the_batch_once(tmp_path):
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        prompts = tmp_path / "p.txt"
        prompts.write_text("a fox\nan owl\n")
        server.kill()
        down_at = time.monotonic()
        stderr = tmp_path / "submit.err"
        proc = zfarm(server.url, ["submit", str(prompts), "--name", "during-the-outage"], stderr)

        def says_it_waits():
            assert proc.poll() is None, stderr.read_text()
            return "retrying for up to 60 s (ZFARM_PRODUCER_REDIS_RETRY_S)" in stderr.read_text()

        wait_for(says_it_waits, 30, what="zfarm submit to say it retries")

        def outage_over():
            # The command must still be waiting, not given up, all through the outage.
            assert proc.poll() is None, f"gave up during the outage: {stderr.read_text()}"
            return time.monotonic() - down_at >= OUTAGE_S

        wait_for(outage_over, OUTAGE_S + 10, interval_s=0.5, what="the outage to last its length")
        server.start()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr.read_text()
        client = server.client()
        batch_id = out.decode().strip().splitlines()[-1]
        assert client.zrange(keys.BATCHES, 0, -1) == [batch_id.encode()]
        assert int(client.hget(keys.batch_counts(batch_id), "queued")) == 2
    finally:
        server.stop()


def test_a_zfarm_command_gives_up_after_the_retry_setting_with_exit_3_and_says_why(tmp_path):
    port = free_port()
    stderr = tmp_path / "status.err"
    started = time.monotonic()
    proc = zfarm(f"redis://:hunter2@127.0.0.1:{port}/0", ["status", "20240101-000000-abcdef"], stderr,
                 ZFARM_PRODUCER_REDIS_RETRY_S="2")
    proc.communicate(timeout=60)
    elapsed_s = time.monotonic() - started
    err = stderr.read_text()
    assert proc.returncode == 3 and 2 <= elapsed_s < 15, (elapsed_s, err)
    lines = err.splitlines()
    assert len(lines) == 2 and "retrying for up to 2 s" in lines[0] and "cannot reach Redis" in lines[1]
    assert "hunter2" not in err and "***" in err


def test_the_retry_is_measured_in_time_not_in_tries(monkeypatch, capsys):
    monkeypatch.setenv("ZFARM_PRODUCER_REDIS_RETRY_S", "3")
    started = time.monotonic()
    assert main(["--redis-url", f"redis://127.0.0.1:{free_port()}/0", "cancel", "20240101-000000-abcdef"]) == 3
    # Refused connections fail at once: a count of tries would give up in a fraction of the setting.
    assert 3 <= time.monotonic() - started < 6
    assert "retrying for up to 3 s" in capsys.readouterr().err
