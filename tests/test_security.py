"""Security checks: JSON only on the wire, only zfarm's own task runs, storage keys only from
validated ids, S3 credentials nowhere in results, logs or Redis."""
from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import uuid

import pytest
import redis

from farm import REPO, S3Server, wait_for
from farm_fixtures import TEST_TABLE
from shared import keys, routing, wire
from shared.schema import Job, JobError, check_id
from shared.storage import FileStorage, S3Storage, StorageError, result_name

SIMULATE = ("--simulate", "0.05")


def zfarm(redis_url: str, storage_url: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, ZFARM_PROFILE_TABLE=str(TEST_TABLE), PYTHONPATH=str(REPO),
               ZFARM_REDIS_URL=redis_url, ZFARM_STORAGE_URL=storage_url)
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def finished(batch, timeout_s: float = 60) -> dict:
    return wait_for(lambda: (lambda s: s if s["finished"] else None)(batch.status()), timeout_s,
                    what=f"batch {batch.id} to finish")


# JSON only

def test_the_worker_app_accepts_and_sends_json_only():
    code = ("import json; from worker.app import app; import worker.tasks; c = app.conf; "
            "print(json.dumps([c.accept_content, "
            "c.task_serializer, c.result_serializer, c.event_serializer, app.tasks['zfarm.render'].serializer]))")
    env = dict(os.environ, ZFARM_PROFILE_TABLE=str(TEST_TABLE), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    accept, task, result, event, render = json.loads(out)
    assert accept == ["json"]
    assert (task, result, event, render) == ("json", "json", "json", "json")


class _CreatesFile:
    """Unpickling this opens (creates) a file: proof that a pickle was executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_message_pushed_into_a_queue_is_rejected_and_never_unpickled(
        start_worker, farm_factory, file_storage_url, redis_client, tmp_path):
    # The payload is live: unpickled here, it makes its file.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_CreatesFile(probe))).close()
    assert probe.exists()

    marker = tmp_path / "executed"
    payload = base64.b64encode(pickle.dumps(([], {"job": _CreatesFile(marker)}, {}))).decode()
    queue = routing.queue("normal", "any", 0)
    declared_pickle = json.loads(wire.render_message({}, "pickle-declared", queue, 60))
    declared_pickle.update({"content-type": "application/x-python-serialize", "content-encoding": "binary",
                            "body": payload})
    declared_json = json.loads(wire.render_message({}, "pickle-as-json", queue, 60))
    declared_json["body"] = payload
    worker = start_worker(file_storage_url, SIMULATE)
    redis_client.lpush(queue, json.dumps(declared_pickle), json.dumps(declared_json))

    wait_for(lambda: redis_client.llen(keys.REJECTED) == 2, 30, what="both pickled messages to be rejected")
    reasons = sorted(json.loads(r)["reason"] for r in redis_client.lrange(keys.REJECTED, 0, -1))
    assert "refused: JSON only" in reasons[1] and "not base64 JSON" in reasons[0]
    after = farm_factory(file_storage_url).submit(["a job after the pickles"])
    assert finished(after)["done"] == 1
    assert not marker.exists()
    assert "pickle-declared] received" not in worker.output() and "pickle-as-json] received" not in worker.output()
    assert worker.proc.poll() is None


def test_a_message_naming_another_task_or_asking_for_callbacks_is_refused_and_nothing_else_runs(
        start_worker, farm_factory, file_storage_url, redis_client):
    farm = farm_factory(file_storage_url)
    batch = farm.submit(["a job whose message is tampered with"])
    queue = next(q for q in redis_client.keys("zfarm.*") if redis_client.llen(q))
    envelope = json.loads(redis_client.rpop(queue))
    other_task = {**envelope, "headers": {**envelope["headers"], "task": "celery.backend_cleanup"}}
    args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    chained = {**envelope, "body": base64.b64encode(json.dumps(
        [args, kwargs, {"callbacks": [{"task": "celery.backend_cleanup", "args": [], "kwargs": {}}],
                        "errbacks": None, "chain": None, "chord": None}]).encode()).decode()}
    redis_client.lpush(queue, json.dumps(other_task), json.dumps(chained))
    worker = start_worker(file_storage_url, SIMULATE)

    status = finished(batch)
    # The first refusal fails the job it names; the second finds it failed already and is rejected.
    assert (status["total"], status["done"], status["failed"]) == (1, 0, 1)
    assert "unknown task 'celery.backend_cleanup'" in status["failures"][0]["message"]
    wait_for(lambda: redis_client.llen(keys.REJECTED) == 1, 10, what="the second message to be rejected")
    assert "callbacks" in json.loads(redis_client.lindex(keys.REJECTED, 0))["reason"]
    assert "celery.backend_cleanup[" not in worker.output() and "] received" not in worker.output()


# Storage keys from validated ids only

@pytest.mark.parametrize("bad_id", ["..", "../../etc", "a/../b", "/etc/passwd", "..\\x", "a..b", ".", "", "a b",
                                    "x" * 65, "-leading-dash", "nul\x00", None, 7])
def test_an_id_that_could_escape_a_storage_prefix_is_refused_before_it_reaches_a_key(bad_id):
    with pytest.raises(JobError):
        check_id(bad_id)
    with pytest.raises(JobError):
        result_name(bad_id, 0, "png")
    with pytest.raises(JobError) as refused:
        Job.from_wire({"version": 1, "batch_id": bad_id, "index": 0,
                       "spec": {"prompt": "p", "seed": 1}})
    assert refused.value.field == "batch_id"


def test_storage_backends_refuse_keys_that_climb_out_of_their_prefix(tmp_path):
    files = FileStorage(str(tmp_path / "root"))
    for name in ("../outside.png", "a/../../outside.png", "/etc/passwd"):
        with pytest.raises(StorageError):
            files.put(name, b"x")
    assert not (tmp_path / "outside.png").exists()
    s3 = S3Storage("bucket", "prefix", client=object())
    for name in ("../x.png", "a/../../x.png"):
        with pytest.raises(StorageError):
            s3._key(name)
    with pytest.raises(StorageError):
        result_name("batch", -1, "png")


@pytest.mark.parametrize("option", ["--name", "--idempotency-key"])
def test_a_batch_name_or_key_with_dot_dot_is_refused_by_zfarm_submit_and_nothing_is_queued(
        option, redis_server, redis_client, file_storage_url, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    result = zfarm(redis_server, file_storage_url, "submit", str(prompts), option, "../../x")
    assert result.returncode == 2 and "no '..'" in result.stderr and "Traceback" not in result.stderr
    assert redis_client.dbsize() == 0


def test_zfarm_commands_refuse_a_batch_id_with_dot_dot_and_write_nothing(redis_server, file_storage_url, tmp_path):
    out = tmp_path / "out"
    for args in (("status", "../../etc"), ("collect", "../../etc", "--out", str(out)), ("cancel", ".."),
                 ("retry", "../x", "--failed")):
        result = zfarm(redis_server, file_storage_url, *args)
        assert result.returncode == 2 and "batch_id" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


# Credentials

def test_s3_credentials_never_reach_sidecars_logs_failure_reasons_or_redis(
        start_worker, farm_factory, redis_server, redis_client, monkeypatch):
    access_key, secret = "AKIAZFARM" + uuid.uuid4().hex[:11].upper(), "zfarm-secret-" + uuid.uuid4().hex
    for name, value in {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret,
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)  # moto takes any credentials; the producer reads these too
    s3 = S3Server().start()
    try:
        s3.client().create_bucket(Bucket="creds")
        storage_url = "s3://creds/out"
        # At DEBUG, where libraries log the most (botocore its requests).
        worker = start_worker(storage_url, (*SIMULATE, "--loglevel", "DEBUG"), s3=s3, AWS_ACCESS_KEY_ID=access_key,
                              AWS_SECRET_ACCESS_KEY=secret, ZFARM_UPLOAD_RETRY_S=1)
        farm = farm_factory(storage_url, s3)
        ok = farm.submit([f"a stored image {i}" for i in range(3)])
        assert finished(ok)["done"] == 3
        sidecars = [farm.storage.get(f"{ok.id}/{i:06d}.json").decode() for i in range(3)]
        s3.stop()  # an upload error is logged and stored as the reason of a failed job
        failing = farm.submit(["an image that cannot be stored"])
        failure = finished(failing)["failures"][0]
        assert failure["kind"] == "upload"
        status_json = zfarm(redis_server, storage_url, "status", failing.id, "--json").stdout
    finally:
        s3.stop()

    dump = []
    client = redis.Redis.from_url(redis_server)
    for key in client.scan_iter():
        kind = client.type(key).decode()
        value = {"string": client.get, "hash": client.hgetall, "list": lambda k: client.lrange(k, 0, -1),
                 "set": client.smembers, "zset": lambda k: client.zrange(k, 0, -1)}.get(kind, lambda k: b"")(key)
        dump.append(f"{key!r} {value!r}")
    for where, text in (("sidecars", "\n".join(sidecars)), ("worker log", worker.output()),
                        ("failure reason", json.dumps(failure)), ("zfarm status", status_json),
                        ("redis", "\n".join(dump))):
        assert access_key not in text, f"access key id in {where}"
        assert secret not in text, f"secret key in {where}"
