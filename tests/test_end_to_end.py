"""The backbone end to end: `zfarm tiny-model`, a `zfarm worker` subprocess on the real
ZImagePipeline loading code, `zfarm submit/status/wait/collect` over a real redis-server, with
results in S3 (moto's server) and in a local folder. The tiny model renders noise."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from farm import REPO, base_env, s3_env

SIZES = [(256, 256), (320, 256), (256, 384)]


def zfarm(args, env, timeout_s=300, check=True, stdin=None):
    proc = subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        raise AssertionError(f"zfarm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    zfarm(["tiny-model", str(folder)], dict(os.environ, PYTHONPATH=str(REPO)), timeout_s=600)
    assert (folder / "model_index.json").is_file()
    return folder


def _prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"a tiny test image number {i}", "seed": 1000 + i,
                         "width": SIZES[i % 3][0], "height": SIZES[i % 3][1], "steps": 2}) for i in range(10)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run_backbone(tmp_path, env, start_worker, storage_url, s3=None):
    worker = start_worker(storage_url, ("--model", str(env["ZFARM_MODEL"])), s3=s3,
                          ZFARM_MODEL=env["ZFARM_MODEL"])
    assert worker.registration["renderer"] == "diffusers"
    submitted = zfarm(["submit", str(_prompts_file(tmp_path)), "--json"], env)
    info = json.loads(submitted.stdout.strip().splitlines()[-1])
    batch_id = info["batch_id"]
    assert info["jobs"] == 10
    zfarm(["wait", batch_id, "--timeout", "600"], env, timeout_s=660)
    status = json.loads(zfarm(["status", batch_id, "--json"], env).stdout)
    assert (status["total"], status["done"], status["failed"], status["queued"]) == (10, 10, 0, 0)

    out = tmp_path / "collected"
    zfarm(["collect", batch_id, "--out", str(out)], env)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 10
    for i in range(10):
        png = next(out.rglob(f"{i:06d}.png"))
        sidecar = json.loads(next(out.rglob(f"{i:06d}.json")).read_text())
        with Image.open(io.BytesIO(png.read_bytes())) as image:
            assert image.size == SIZES[i % 3]
            assert "Seed: %d" % (1000 + i) in image.text["parameters"]
        assert sidecar["prompt"] == f"a tiny test image number {i}" and sidecar["seed"] == 1000 + i
        assert sidecar["worker"] == worker.registration["name"] and sidecar["simulated"] is False
        # The worker's own versions beside the renderer's: neither overwrites the other.
        assert {"celery", "kombu", "redis", "torch", "diffusers", "transformers", "cuda"} <= set(sidecar["versions"])
    sheet = (out / "index.html").read_text()
    assert sheet.count("<img") == 10 and "a tiny test image number 7" in sheet
    return batch_id


def test_prompts_from_a_jsonl_file_become_pngs_in_s3_rendered_by_the_tiny_pipeline(
        tmp_path, tiny_model, start_worker, redis_server, s3_server, s3_storage_url):
    env = base_env(redis_server, s3_storage_url, ZFARM_MODEL=str(tiny_model), **s3_env(s3_server))
    _run_backbone(tmp_path, env, start_worker, s3_storage_url, s3=s3_server)


def test_the_same_run_with_results_in_a_local_folder(tmp_path, tiny_model, start_worker, redis_server,
                                                     file_storage_url):
    env = base_env(redis_server, file_storage_url, ZFARM_MODEL=str(tiny_model))
    batch_id = _run_backbone(tmp_path, env, start_worker, file_storage_url)
    stored = sorted(p.name for p in (tmp_path / "results" / batch_id).iterdir())
    assert stored == sorted([f"{i:06d}.{ext}" for i in range(10) for ext in ("png", "json")])
