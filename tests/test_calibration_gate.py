"""The quality gate at boot and by hand (worker.calibration, worker.calibrate), with real redis-server,
moto's S3 server and `zfarm worker` subprocesses on the tiny model (lossless, float32 on the CPU) and the
tiny hostile model (worker.engine.hostile), whose MLP inputs reach 6.6e4.

A lossless worker renders the farm's references; `zfarm calibrate` passes its profile; the naive
per-tensor fp8 profile fails and steps down through safer variants; a second boot reads every verdict
from the cache and loads none of the failing variants again; the shipped fp8 recipe passes and its
quality block reaches the registry, `zfarm workers --json` and every sidecar; skipping is recorded;
with no references and no way to make them a lossy worker stops and says what to run. The renderer's
side of step-down is tested with judges made here."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from farm import REPO, base_env, s3_env, wait_for
from farm_fixtures import TEST_TABLE
from shared import calibration, keys, profiles, registry
from shared.errors import QualityFailed
from shared.schema import JobSpec
from shared.settings import Settings
from worker.engine.detect import BootInfo
from worker.engine.diffusion import DiffusionRenderer

# Two 256x256 probes of 8 steps: seconds on the tiny models, and the same verdicts as the full set would give there.
PROBES = {"ZFARM_CALIBRATION_PROBES": "2", "ZFARM_CALIBRATION_SIZE_PX": "256", "ZFARM_CALIBRATION_STEPS": "8"}
# A boot here may render the references and four variants of a profile on a shared CPU.
BOOT_TIMEOUT_S = 400


def farm_env(redis_server, storage_url, s3, **extra) -> dict:
    return base_env(redis_server, storage_url, ZFARM_PROFILE_TABLE=str(TEST_TABLE), **s3_env(s3), **PROBES, **extra)


def zfarm(args, env, timeout_s=BOOT_TIMEOUT_S):
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s)


def boot(start_worker, redis_client, storage_url, s3, model, *args, **env) -> tuple:
    """A worker on `model` started and waited for until it is ready (or has stopped): (process, entry)."""
    worker = start_worker(storage_url, ("--model", str(model), *args), wait_ready=False, s3=s3,
                          ZFARM_MODEL=str(model), **PROBES, **env)

    def settled():
        entries = [w for w in registry.live_workers(redis_client) if w.get("pid") == worker.proc.pid]
        if entries and entries[0].get("state") == "ready":
            return entries[0]
        if worker.proc.poll() is not None:
            return {"exited": worker.proc.returncode}
        return None

    return worker, wait_for(settled, BOOT_TIMEOUT_S, interval_s=0.2, what="the worker to be ready or to stop")


def stored(s3, storage_url: str, under: str = calibration.STORAGE_PREFIX) -> list[str]:
    bucket, _, prefix = storage_url[len("s3://"):].partition("/")
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{under}")
    return sorted(o["Key"][len(prefix) + 1:] for o in listed.get("Contents", []))


def read(s3, storage_url: str, name: str) -> bytes:
    bucket, _, prefix = storage_url[len("s3://"):].partition("/")
    return s3.client().get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()


@pytest.fixture
def submit_one():
    def submit(env) -> str:
        proc = subprocess.run([sys.executable, "-m", "producer.cli", "submit", "-", "--steps", "2", "--width", "256",
                               "--height", "256", "--json"], env=env, cwd=REPO, input="a fox in the snow\n",
                               capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        batch_id = json.loads(proc.stdout.strip().splitlines()[-1])["batch_id"]
        waited = zfarm(["wait", batch_id, "--timeout", "300"], env)
        assert waited.returncode == 0, waited.stderr
        return batch_id
    return submit


# Workers at boot
def test_a_lossless_worker_serves_unjudged_and_zfarm_calibrate_makes_the_references_and_passes_its_profile(
        tiny_dir, start_worker, redis_server, redis_client, s3_server, s3_storage_url):
    _, entry = boot(start_worker, redis_client, s3_storage_url, s3_server, tiny_dir)
    assert (entry["profile"], entry["policy"]) == ("cpu", "none")
    assert entry["quality"]["status"] == "lossless" and entry["quality"]["psnr_db"] is None
    assert stored(s3_server, s3_storage_url) == []   # a lossless worker renders no probe at boot

    done = zfarm(["calibrate", "--json", "--model", str(tiny_dir)], farm_env(redis_server, s3_storage_url, s3_server))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert (out["passed"], out["profile"], out["lossy"]) == (True, "cpu", False)
    assert [(p["id"], p["psnr_db"], p["ssim"], p["passed"]) for p in out["probes"]] == [
        ("text-sign", calibration.PSNR_IDENTICAL_DB, 1.0, True), ("portrait", calibration.PSNR_IDENTICAL_DB, 1.0, True)]
    references = [n for n in stored(s3_server, s3_storage_url) if "/references/" in n]
    assert [n.rsplit("/", 1)[1] for n in references] == ["portrait.png", "provenance.json", "text-sign.png"]
    provenance = json.loads(read(s3_server, s3_storage_url, references[1]))
    assert provenance["profile"] == "cpu" and provenance["versions"]["torch"] == torch.__version__
    assert provenance["revision"] == out["revision"] and provenance["made_by"].startswith("calibrate@")


def test_a_broken_quantisation_fails_the_gate_steps_down_to_a_safer_variant_and_a_second_boot_reads_the_cache(
        hostile_dir, start_worker, redis_server, redis_client, s3_server, s3_storage_url):
    first, entry = boot(start_worker, redis_client, s3_storage_url, s3_server, hostile_dir,
                        "--profile", "cpu_fp8_naive", "--name", "naive")
    assert "rendering 2 calibration references with cpu" in first.output()
    assert (entry["profile"], entry["policy"], entry["downgraded_from"]) == ("cpu_fp8_naive", "bf16", "cpu_fp8_naive")
    assert entry["downgrade_reason"].startswith("quality: QualityFailed: cpu_fp8_naive (policy blocks) fails")
    attempts = [(a["policy"], a["kind"]) for a in entry["boot_attempts"]]
    assert attempts == [("blocks", "quality"), ("edges", "quality"), ("half", "quality"), ("bf16", "ok")]
    assert entry["quality"]["status"] == "lossless" and entry["quality"]["policy"] == "bf16"
    first.stop()

    second, again = boot(start_worker, redis_client, s3_storage_url, s3_server, hostile_dir,
                         "--profile", "cpu_fp8_naive", "--name", "naive")
    log = second.output()
    # The three failing variants' verdicts come from the cache, and none of them is loaded again: the
    # only pipeline this boot loads is the one that serves.
    assert log.count("quality gate failed for cpu_fp8_naive") == 3 and log.count("(cached): not loaded") == 3
    loaded = re.findall(r"loaded \S+ with profile (.*?) in ", log)
    assert loaded == ["cpu_fp8_naive (applied as cpu_fp8_naive, policy bf16)"]
    assert "calibration references" not in log   # neither rendered nor stored again
    assert [(a["policy"], a["kind"]) for a in again["boot_attempts"]] == attempts
    assert again["downgrade_reason"].startswith("quality: QualityFailed: cpu_fp8_naive (policy blocks) fails")
    assert again["downgrade_reason"].endswith("(cached verdict)")


def test_a_lossy_profile_that_passes_serves_and_its_quality_reaches_the_registry_every_sidecar_and_zfarm_workers(
        hostile_dir, start_worker, redis_server, redis_client, s3_server, s3_storage_url, submit_one):
    env = farm_env(redis_server, s3_storage_url, s3_server)
    worker, entry = boot(start_worker, redis_client, s3_storage_url, s3_server, hostile_dir, "--profile", "cpu_fp8")
    quality = entry["quality"]
    assert (entry["policy"], quality["status"], quality["policy"]) == ("blocks", "passed", "blocks")
    assert quality["psnr_db"] > 25 and quality["ssim"] > 0.9 and quality["calibrated_at"] > 0
    assert quality["reference"].startswith("cpu on cpu") and "cached" not in quality

    batch_id = submit_one(env)
    sidecar = json.loads(read(s3_server, s3_storage_url, f"{batch_id}/000000.json"))
    assert sidecar["profile"] == "cpu_fp8" and sidecar["quality"] == quality and sidecar["policy"] == "blocks"
    listed = zfarm(["workers", "--json"], env)
    [row] = json.loads(listed.stdout)
    assert row["quality"] == quality and row["policy"] == "blocks"
    table = zfarm(["workers"], env).stdout
    assert f"passed {quality['psnr_db']:.1f} dB" in table
    worker.stop()

    # The verdict is kept in storage too: with Redis's copy gone, the next boot reads it from there.
    for key in redis_client.scan_iter(f"{keys.PREFIX}:calibration:*"):
        redis_client.delete(key)
    again, entry = boot(start_worker, redis_client, s3_storage_url, s3_server, hostile_dir, "--profile", "cpu_fp8")
    assert entry["quality"]["cached"] is True and entry["quality"]["psnr_db"] == quality["psnr_db"]
    assert "quality gate passed for cpu_fp8 (policy blocks) (cached)" in again.output()
    assert list(redis_client.scan_iter(f"{keys.PREFIX}:calibration:*:cpu_fp8:blocks:*"))


def test_with_calibration_skipped_a_lossy_profile_serves_unjudged_and_every_sidecar_says_so(
        hostile_dir, start_worker, redis_server, redis_client, s3_server, s3_storage_url, submit_one):
    env = farm_env(redis_server, s3_storage_url, s3_server)
    _, entry = boot(start_worker, redis_client, s3_storage_url, s3_server, hostile_dir,
                    "--profile", "cpu_fp8_naive", ZFARM_SKIP_CALIBRATION="1")
    assert (entry["policy"], entry["quality"]["status"]) == ("blocks", "skipped")
    assert "ZFARM_SKIP_CALIBRATION" in entry["quality"]["reason"] and "downgraded_from" not in entry
    assert stored(s3_server, s3_storage_url) == []   # nothing rendered, nothing stored
    batch_id = submit_one(env)
    sidecar = json.loads(read(s3_server, s3_storage_url, f"{batch_id}/000000.json"))
    assert sidecar["quality"]["status"] == "skipped" and sidecar["profile"] == "cpu_fp8_naive"


def test_a_lossy_worker_with_no_references_and_no_way_to_make_them_stops_and_names_zfarm_calibrate_reference(
        hostile_dir, start_worker, redis_server, redis_client, s3_server, s3_storage_url):
    worker, entry = boot(start_worker, redis_client, s3_storage_url, s3_server, hostile_dir, "--profile", "cpu_fp8",
                         ZFARM_CALIBRATION_MAKE_REFERENCES="0")
    assert entry == {"exited": 78}
    assert "zfarm calibrate --reference" in worker.output()
    [failed] = [w for w in registry.live_workers(redis_client) if w.get("pid") == worker.proc.pid]
    assert failed["state"] == "failed" and "no calibration references" in failed["error"]

    made = zfarm(["calibrate", "--reference", "--json", "--model", str(hostile_dir)],
                 farm_env(redis_server, s3_storage_url, s3_server))
    assert made.returncode == 0, made.stderr[-3000:]
    out = json.loads(made.stdout.strip().splitlines()[-1])
    assert out["profile"] == "cpu" and out["probes"] == ["text-sign", "portrait"]
    _, entry = boot(start_worker, redis_client, s3_storage_url, s3_server, hostile_dir, "--profile", "cpu_fp8",
                    ZFARM_CALIBRATION_MAKE_REFERENCES="0")
    assert entry["quality"]["status"] == "passed"


# The renderer's side, with judges made here
def hostile_renderer(hostile_dir, chosen: str, *fallbacks: str, table=None) -> DiffusionRenderer:
    def choice(name):
        return profiles.Choice(16, name, 1.0, 10.0, 12.0, profiles.REFERENCE_PIXELS, 15.0)

    boot_info = BootInfo(host="test", device="cpu", gpu="cpu", vram_gib=16.0, vram_class=16, cap_gib=None,
                         compute_capability="", host_ram_gib=32.0, choice=choice(chosen),
                         fallbacks=tuple(choice(f) for f in fallbacks))
    return DiffusionRenderer(Settings.from_env({}, model=str(hostile_dir), warmup=False), boot_info,
                             table=table or {"runs": []})


def test_with_no_references_to_judge_by_a_lossy_profile_goes_straight_to_the_lossless_ones(hostile_dir):
    judged = []

    def judge(renderer):
        judged.append((renderer.loading_profile, renderer.policy))
        if renderer.lossy:
            raise QualityFailed("no calibration references", try_safer=False)
        return {"status": "lossless"}

    renderer = hostile_renderer(hostile_dir, "cpu_fp8_naive", "cpu_fp8", "cpu")
    renderer.load(judge=judge)
    assert judged == [("cpu_fp8_naive", "blocks"), ("cpu", "none")]   # neither safer variants nor cpu_fp8
    assert renderer.profile == "cpu" and renderer.quality == {"status": "lossless"}
    assert renderer.boot_step_down["from"] == "cpu_fp8_naive" and renderer.boot_step_down["to"] == "cpu"


def test_a_profile_an_out_of_memory_step_down_loads_passes_the_gate_before_it_renders(hostile_dir, monkeypatch):
    table = {"runs": [{"profile": "cpu_fp8", "cap_gib": 15.0, "ok": True, "s_per_image": 1.0,
                       "peak_reserved_gib": 12.0},
                      {"profile": "cpu_fp8_naive", "cap_gib": 15.0, "ok": True, "s_per_image": 2.0,
                       "peak_reserved_gib": 6.0}]}
    judged = []

    def judge(renderer):
        judged.append((renderer.loading_profile, renderer.policy))
        if renderer.loading_profile == "cpu_fp8_naive" and renderer.policy != "half":
            raise QualityFailed("degraded")
        return {"status": "passed", "policy": renderer.policy}

    renderer = hostile_renderer(hostile_dir, "cpu_fp8", table=table)
    renderer.load(judge=judge)
    real_generate = DiffusionRenderer._generate
    calls = []

    def generate(self, spec):
        calls.append(self.profile)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real_generate(self, spec)

    monkeypatch.setattr(DiffusionRenderer, "_generate", generate)
    result = renderer.render(JobSpec(prompt="a fox", width=256, height=256, steps=1, seed=3))
    assert judged == [("cpu_fp8", "blocks"), ("cpu_fp8_naive", "blocks"), ("cpu_fp8_naive", "edges"),
                      ("cpu_fp8_naive", "half")]
    assert result.facts["oom_step_down"] == {"from": "cpu_fp8", "to": "cpu_fp8_naive"}
    assert result.facts["policy"] == "half" and result.facts["quality"] == {"status": "passed", "policy": "half"}


def test_flowers_stats_and_the_registry_entry_carry_the_quality_block(redis_client, monkeypatch):
    from worker import config, inspect_info, registration
    from worker.state import WorkerState

    state = WorkerState()
    monkeypatch.setattr(registration, "STATE", state)
    monkeypatch.setattr(inspect_info, "STATE", state)
    monkeypatch.setattr(config, "_settings", Settings.from_env({}))
    monkeypatch.setattr(config, "_table", {"runs": []})
    state.boot = BootInfo(host="h", device="cuda", gpu="H100", vram_gib=80.0, vram_class=80, cap_gib=None,
                          compute_capability="9.0", host_ram_gib=64.0, arch="sm_90",
                          choice=profiles.Choice(80, "fp8mm_fast_qk_compiled", 0.6, 16.0, 12.0, 4194304, 79.0))
    state.name, state.instance, state.ready = "w@h", "i1", True
    state.policy = "edges"
    state.quality = calibration.quality_block(calibration.PASSED, "edges", {"psnr_db_min": 27.5, "ssim_min": 0.91},
                                              reference="resident on H100 (sm_90)", calibrated_at=1.0)
    registry.register(redis_client, registration.registration(config.settings()), 30)
    entry = registry.live_workers(redis_client)[0]
    assert entry["quality"] == state.quality and entry["policy"] == "edges"
    info = inspect_info.InfoStep.info(None, None)["zfarm"]
    assert info["quality"]["psnr_db"] == 27.5 and info["policy"] == "edges"
