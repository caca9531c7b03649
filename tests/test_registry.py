"""Worker registration in a real Redis: TTL heartbeat, expiry of dead workers, deregistration."""
from __future__ import annotations

import json

import pytest

from farm import wait_for
from producer.cli import main
from shared import registry


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


def test_job_counts_and_the_moving_average_speed_are_kept_per_worker(redis_client):
    registry.register(redis_client, entry(), ttl_s=60)
    registry.record_job(redis_client, "zimage-12g@box", "done", 2.0)
    registry.record_job(redis_client, "zimage-12g@box", "done", 8.0, pixel_steps_ratio=2.0)
    registry.record_job(redis_client, "zimage-12g@box", "failed", None)
    [worker] = registry.live_workers(redis_client)
    assert (worker["jobs_done"], worker["jobs_failed"]) == (2, 1)
    assert worker["s_per_image"] == pytest.approx(0.8 * 2.0 + 0.2 * 4.0)


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
