"""Worker registration in a real Redis: TTL heartbeat, expiry of dead workers, deregistration."""
from __future__ import annotations

import json

import pytest

from farm import LosesOneReply, client_that_loses_one_reply, wait_for
from producer.api import Farm
from producer.cli import main
from shared import registry
from shared.ledger import Ledger
from shared.settings import Settings


def entry(name="zimage-12g@box", **extra):
    return {"name": name, "host": "box", "gpu": "NVIDIA GeForce RTX 3060", "vram_gb": 12.0, "vram_class": 12,
            "profile": "te_stream_fp8", "max_pixels": 1048576, "state": "ready", **extra}


def test_a_registered_worker_is_live_until_its_heartbeat_stops(redis_client):
    registry.register(redis_client, entry(), ttl_s=0.5)
    assert [w["name"] for w in registry.live_workers(redis_client)] == ["zimage-12g@box"]
    assert registry.heartbeat(redis_client, "zimage-12g@box", ttl_s=0.5) is True
    wait_for(lambda: registry.live_workers(redis_client) == [], 5, what="the entry to expire")
    assert registry.heartbeat(redis_client, "zimage-12g@box", ttl_s=0.5) is False


def test_deregistering_removes_the_worker_at_once(redis_client):
    registry.register(redis_client, entry(), ttl_s=60)
    registry.deregister(redis_client, "zimage-12g@box")
    assert registry.live_workers(redis_client) == []


def test_the_moving_average_speed_is_kept_per_worker_normalised_to_a_1024px_8_step_image(redis_client):
    registry.register(redis_client, entry(), ttl_s=60)
    registry.record_render_time(redis_client, "zimage-12g@box", 2.0)
    registry.record_render_time(redis_client, "zimage-12g@box", 8.0, pixel_steps_ratio=2.0)
    [worker] = registry.live_workers(redis_client)
    assert worker["s_per_image"] == pytest.approx(0.8 * 2.0 + 0.2 * 4.0)


def test_a_workers_job_counts_go_up_with_the_ledger_transition_and_only_once_per_job(redis_client, redis_server):
    registry.register(redis_client, entry(), ttl_s=60)
    batch = Farm(Settings.from_env(redis_url=redis_server), table={"runs": []}).submit(["a", "b", "c"])
    ledger, name = Ledger(redis_client), "zimage-12g@box"
    boom = {"kind": "render-error", "message": "boom"}
    assert ledger.finish(batch.id, 0, "done", worker=name) is True
    assert ledger.finish(batch.id, 0, "done", worker=name) is False
    assert ledger.finish(batch.id, 1, "failed", boom, worker=name) is True
    assert ledger.finish(batch.id, 1, "failed", boom, worker=name) is False
    assert ledger.finish(batch.id, 2, "done") is True  # no worker named (a sweep, say): nobody's count
    [worker] = registry.live_workers(redis_client)
    assert (worker["jobs_done"], worker["jobs_failed"]) == (1, 1)


def test_a_finish_retried_after_its_reply_was_lost_counts_the_job_once(redis_client, redis_server):
    registry.register(redis_client, entry(), ttl_s=60)
    batch = Farm(Settings.from_env(redis_url=redis_server), table={"runs": []}).submit(["a"])
    retrying = client_that_loses_one_reply(redis_server)
    ledger = Ledger(retrying)
    LosesOneReply.armed = b"EVALSHA"
    ledger.finish(batch.id, 0, "done", worker="zimage-12g@box")
    assert LosesOneReply.armed == b""  # the reply was lost and the call retried
    [worker] = registry.live_workers(redis_client)
    assert worker["jobs_done"] == 1
    assert Ledger(redis_client).status(batch.id)["done"] == 1
    retrying.close()


def test_zfarm_workers_lists_every_field_users_rely_on(redis_client, redis_server, monkeypatch, capsys):
    monkeypatch.setenv("ZFARM_REDIS_URL", redis_server)
    registry.register(redis_client, entry(), ttl_s=60)
    registry.register(redis_client, entry("zimage-24g@box2", vram_class=24, vram_gb=24.0, profile="resident"),
                      ttl_s=60)
    assert main(["workers", "--json"]) == 0
    workers = json.loads(capsys.readouterr().out)
    assert [w["name"] for w in workers] == ["zimage-12g@box", "zimage-24g@box2"]
    for key in ("name", "host", "gpu", "vram_gb", "vram_class", "profile", "jobs_done", "jobs_failed",
                "s_per_image", "last_seen"):
        assert key in workers[0]
    assert workers[1]["vram_class"] == 24 and workers[1]["profile"] == "resident"
