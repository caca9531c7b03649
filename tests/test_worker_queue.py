"""The worker on the queue: real redis-server, real worker subprocesses, S3 through moto's server."""
from __future__ import annotations

import json
import signal

from farm import wait_for
from shared import keys, registry, routing, wire

SIMULATE = ("--simulate", "0.05")


def _finished(batch, timeout_s=60):
    return wait_for(lambda: (lambda s: s if s["done"] + s["failed"] + s["cancelled"] >= s["total"] else None)(
        batch.status()), timeout_s, what="the batch to finish")


def test_a_worker_renders_a_batch_and_stores_each_png_and_sidecar_in_s3(start_worker, farm_factory, s3_server,
                                                                         s3_storage_url):
    worker = start_worker(s3_storage_url, SIMULATE, s3=s3_server)
    farm = farm_factory(s3_storage_url, s3_server)
    batch = farm.submit([{"prompt": f"a lighthouse number {i}", "seed": 100 + i, "width": 512, "height": 768}
                         for i in range(5)])
    status = _finished(batch)
    assert (status["done"], status["failed"], status["queued"], status["running"]) == (5, 0, 0, 0)
    names = farm.storage.list(batch.id)
    assert names == sorted([f"{batch.id}/{i:06d}.{ext}" for i in range(5) for ext in ("png", "json")])
    sidecar = json.loads(farm.storage.get(f"{batch.id}/000003.json"))
    assert sidecar["prompt"] == "a lighthouse number 3" and sidecar["seed"] == 103
    assert (sidecar["width"], sidecar["height"], sidecar["index"]) == (512, 768, 3)
    assert sidecar["worker"] == worker.registration["name"] and sidecar["simulated"] is True
    for key in ("negative_prompt", "steps", "guidance", "batch_id", "gpu", "vram_class", "profile", "model",
                "versions", "render_s"):
        assert key in sidecar
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(sidecar) and "test" != sidecar.get("aws")


def test_a_malformed_message_in_the_queue_fails_its_job_and_the_worker_renders_the_next(
        start_worker, farm_factory, file_storage_url, redis_client):
    farm = farm_factory(file_storage_url)
    batch = farm.submit([{"prompt": f"p{i}", "seed": i} for i in range(3)])
    queue = next(k.decode() for k in redis_client.keys("zfarm.normal.*") if redis_client.llen(k))
    # Job 1's message is replaced by one whose width is not a multiple of 16.
    messages = redis_client.lrange(queue, 0, -1)
    for raw in messages:
        if wire.envelope_task_id(raw).endswith("-000001"):
            redis_client.lrem(queue, 1, raw)
    bad_job = {"version": 1, "batch_id": batch.id, "index": 1, "priority": "normal", "tier": "any",
               "submitted_at": 0, "spec": {"prompt": "x", "negative_prompt": "", "width": 1000, "height": 512,
                                           "steps": 8, "guidance": 0, "seed": 1}}
    redis_client.rpush(queue, wire.render_message(bad_job, "tampered-1", queue, 60))
    start_worker(file_storage_url, SIMULATE)
    status = _finished(batch)
    assert (status["done"], status["failed"]) == (2, 1)
    assert status["failures"][0]["index"] == 1 and status["failures"][0]["field"] == "width"
    assert "multiple of 16" in status["failures"][0]["message"]


def test_junk_pushed_into_a_queue_is_recorded_as_rejected_and_does_not_stop_the_worker(
        start_worker, farm_factory, file_storage_url, redis_client):
    worker = start_worker(file_storage_url, SIMULATE)
    queue = routing.queue("normal", "any", 0)
    junk = [b"not json at all", b"[1, 2, 3]", b'{"body": "x"}',
            json.dumps({"body": "%%%", "properties": {"delivery_tag": "t", "body_encoding": "base64"}}).encode(),
            wire.task_message("zfarm.nonexistent", "unknown-task", {"job": {}}, queue).encode(),
            wire.task_message("zfarm.render", "no-batch", {"job": {"version": 1}}, queue).encode()]
    redis_client.lpush(queue, *junk)
    wait_for(lambda: redis_client.llen(keys.REJECTED) >= len(junk), 30, what="every junk item to be rejected")
    reasons = [json.loads(r)["reason"] for r in redis_client.lrange(keys.REJECTED, 0, -1)]
    assert any("not JSON" in r for r in reasons) and any("unknown task" in r for r in reasons)
    farm = farm_factory(file_storage_url)
    status = _finished(farm.submit(["after the junk"]))
    assert status["done"] == 1 and worker.proc.poll() is None


def test_cancelled_jobs_are_skipped_and_never_rendered(start_worker, farm_factory, file_storage_url):
    farm = farm_factory(file_storage_url)
    batch = farm.submit([{"prompt": f"p{i}", "seed": i} for i in range(20)])
    assert batch.cancel() == 20
    start_worker(file_storage_url, SIMULATE)
    other = farm.submit(["a job submitted after the cancel"])
    _finished(other)
    status = batch.status()
    assert (status["cancelled"], status["done"], status["queued"]) == (20, 0, 0)
    assert farm.storage.list(batch.id) == []


def test_a_worker_registers_its_class_and_profile_and_deregisters_on_clean_shutdown(
        start_worker, file_storage_url, redis_client):
    worker = start_worker(file_storage_url, (*SIMULATE, "--vram-gb", "24"))
    entry = worker.registration
    assert entry["vram_class"] == 24 and entry["profile"] == "resident" and entry["max_pixels"] == 2048 * 2048
    assert entry["name"].startswith("zimage-24g@")
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(30) == 0
    assert registry.live_workers(redis_client) == []


def test_a_worker_whose_model_cannot_be_found_stops_at_boot_with_a_clear_message(
        start_worker, file_storage_url, redis_client, tmp_path):
    worker = start_worker(file_storage_url, ("--model", str(tmp_path / "no-such-model")), wait_ready=False)
    assert worker.proc.wait(60) == 78
    out = worker.output()
    assert "no-such-model" in out and "ZFARM_MODEL" in out and "model_index.json" in out
    assert registry.live_workers(redis_client) == []


def test_two_workers_of_one_class_on_one_host_get_different_names(start_worker, file_storage_url):
    first = start_worker(file_storage_url, SIMULATE)
    second = start_worker(file_storage_url, SIMULATE)
    assert first.registration["name"] != second.registration["name"]
    assert second.registration["name"].startswith("zimage-cpu-2@")
