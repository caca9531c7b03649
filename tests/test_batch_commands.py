"""Following a batch: wait's exit codes, collect's files, retry, workers, profiles, pass-through commands.

Jobs are completed by `StandInWorker`, a thread that does what a worker does to Redis and storage
(pop a message, start, upload, finish) without rendering, so these tests need no model.
"""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from producer import cli as cli_module
from producer.api import Farm
from producer.cli import main, profiles_report
from producer.progress import Progress, format_duration
from shared import keys, registry
from shared.ledger import Ledger
from shared.schema import Job
from shared.settings import Settings
from shared.storage import open_storage, result_name

XSS_PROMPT = '<script>alert("x")</script> & a fox'


class StandInWorker(threading.Thread):
    """Pops zfarm messages and records each job done, or failed when its prompt says "fail"."""

    def __init__(self, redis_url: str, storage_url: str, name: str = "stand-in"):
        super().__init__(daemon=True)
        farm = Farm(Settings.from_env(redis_url=redis_url, storage_url=storage_url), table={"runs": []})
        self.redis, self.ledger, self.storage, self.name = farm.redis, farm.ledger, farm.storage, name
        self.stopping = threading.Event()
        self.error = None

    def run(self):
        try:
            while not self.stopping.is_set():
                queues = sorted(q.decode() for q in self.redis.keys("zfarm.*"))
                popped = self.redis.brpop(queues, timeout=0.2) if queues else None
                if popped is None:
                    self.stopping.wait(0.05)
                    continue
                envelope = json.loads(popped[1])
                _, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
                self.complete(Job.from_wire(kwargs["job"]))
        except Exception as exc:  # surfaced by stop(), so a test fails with the cause
            self.error = exc

    def complete(self, job: Job) -> None:
        assert self.ledger.start(job, self.name) == "run"
        if "fail" in job.spec.prompt:
            self.ledger.finish(job.batch_id, job.index, "failed",
                               {"kind": "render-error", "message": "RuntimeError: <boom>", "worker": self.name},
                               tier=job.tier)
            return
        self.storage.put(result_name(job.batch_id, job.index, "png"), b"\x89PNG fake", "image/png")
        sidecar = {**job.spec.to_dict(), "worker": self.name, "profile": "offload<1>"}
        self.storage.put(result_name(job.batch_id, job.index, "json"), json.dumps(sidecar).encode())
        self.ledger.finish(job.batch_id, job.index, "done", tier=job.tier)

    def stop(self):
        self.stopping.set()
        self.join(10)
        if self.error:
            raise self.error


@pytest.fixture
def storage_url(tmp_path):
    return f"file://{tmp_path / 'store'}"


@pytest.fixture
def cli(redis_server, storage_url, capsys):
    def run(*args):
        code = main(["--redis-url", redis_server, "--storage-url", storage_url, *map(str, args)])
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def worker(redis_server, storage_url):
    stand_in = StandInWorker(redis_server, storage_url)
    stand_in.start()
    yield stand_in
    stand_in.stop()


def prompts(tmp_path, *lines: str) -> str:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "width": 256, "height": 256, "seed": i}) + "\n"
                            for i, p in enumerate(lines)))
    return str(path)


# Wait
def test_wait_times_out_with_exit_2_while_jobs_are_queued(cli, tmp_path):
    batch_id = cli("submit", prompts(tmp_path, "a fox"))[1].strip()
    started = time.monotonic()
    code, out, err = cli("wait", batch_id, "--timeout", "0.3")
    assert code == 2 and "timed out after 0.3 s" in err
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "soon"])
def test_a_bad_timeout_is_refused_before_anything_is_queued(cli, tmp_path, redis_client, timeout):
    code, out, err = cli("submit", prompts(tmp_path, "a fox"), "--wait", "--timeout", timeout)
    assert code == 2 and out == "" and "argument --timeout" in err and "timed out" not in err
    assert redis_client.keys("zfarm*") == []
    code, _, err = cli("wait", "20240101-000000-abcdef", "--timeout", timeout)
    assert code == 2 and "argument --timeout" in err


def test_a_timeout_may_be_written_with_a_unit(cli, tmp_path):
    batch_id = cli("submit", prompts(tmp_path, "a fox"))[1].strip()
    code, _, err = cli("wait", batch_id, "--timeout", "0.2s")
    assert code == 2 and "timed out after 0.2 s" in err


def test_the_api_refuses_a_negative_or_nan_timeout(redis_server, storage_url, tmp_path):
    farm = Farm(Settings.from_env(redis_url=redis_server, storage_url=storage_url), table={"runs": []})
    batch = farm.submit(["a fox"])
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="timeout_s"):
            batch.wait(timeout_s=bad)


def test_wait_exits_0_when_every_job_is_done(cli, tmp_path, worker):
    batch_id = cli("submit", prompts(tmp_path, "a fox", "an owl"))[1].strip()
    code, out, err = cli("wait", batch_id, "--timeout", "30")
    assert code == 0, err
    assert f"{batch_id}: 2/2 (2 done, 0 failed, 0 running)" in err.splitlines()


def test_wait_exits_1_when_a_job_failed_and_status_gives_the_reason(cli, tmp_path, worker):
    batch_id = cli("submit", prompts(tmp_path, "a fox", "please fail"))[1].strip()
    assert cli("wait", batch_id, "--timeout", "30")[0] == 1
    status = json.loads(cli("status", batch_id, "--json")[1])
    assert (status["done"], status["failed"]) == (1, 1)
    assert status["failures"] == [{"index": 1, "kind": "render-error", "message": "RuntimeError: <boom>",
                                   "worker": "stand-in"}]
    code, out, _ = cli("status", batch_id)
    assert "1\tstand-in\trender-error: RuntimeError: <boom>" in out.splitlines()


def test_wait_exits_1_for_a_cancelled_batch(cli, tmp_path):
    batch_id = cli("submit", prompts(tmp_path, "a fox"))[1].strip()
    cli("cancel", batch_id)
    assert cli("wait", batch_id, "--timeout", "5")[0] == 1


def test_submit_wait_out_renders_collects_and_prints_the_contact_sheet(cli, tmp_path, worker):
    out_dir = tmp_path / "out"
    code, out, err = cli("submit", prompts(tmp_path, "a fox", "an owl"), "--wait", "--out", out_dir,
                         "--timeout", "30")
    assert code == 0, err
    sheet, batch_id = out.splitlines()[-2:]
    assert sheet == str(out_dir / "index.html") and batch_id.startswith("20")
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "000000.json", "000000.png", "000001.json", "000001.png", "index.html", "manifest.jsonl"]


def test_submit_json_with_wait_prints_one_object(cli, tmp_path, worker):
    code, out, err = cli("submit", prompts(tmp_path, "a fox"), "--wait", "--timeout", "30", "--json")
    result = json.loads(out)
    assert code == 0 and len(out.strip().splitlines()) == 1
    assert result["jobs"] == 1 and result["status"]["done"] == 1 and result["batch_id"]


def test_out_without_wait_is_a_usage_error(cli, tmp_path):
    code, out, err = cli("submit", prompts(tmp_path, "a fox"), "--out", tmp_path / "o")
    assert (code, out) == (2, "") and err == "zfarm: --out and --timeout need --wait\n"


# Collect
def test_collect_writes_images_manifest_and_an_escaped_contact_sheet(cli, tmp_path, worker, storage_url):
    batch_id = cli("submit", prompts(tmp_path, XSS_PROMPT, "please fail", "an owl"))[1].strip()
    assert cli("wait", batch_id, "--timeout", "30")[0] == 1
    store = open_storage(storage_url)
    store.put(f"{batch_id}/notes.txt", b"not a result")  # foreign files under the prefix are left alone
    out_dir = tmp_path / "out"
    code, out, err = cli("collect", batch_id, "--out", out_dir)
    assert code == 0 and out.strip() == str(out_dir / "index.html")
    assert "collected 2 of 3 images" in err
    assert not (out_dir / "notes.txt").exists()
    assert (out_dir / "000000.png").read_bytes() == b"\x89PNG fake"

    rows = [json.loads(line) for line in (out_dir / "manifest.jsonl").read_text().splitlines()]
    assert [(r["index"], r["status"], r["png"], r["seed"], r["worker"], r["reason"]) for r in rows] == [
        (0, "done", "000000.png", 0, "stand-in", None),
        (1, "failed", None, 1, "stand-in", "render-error: RuntimeError: <boom>"),
        (2, "done", "000002.png", 2, "stand-in", None)]
    assert rows[0]["prompt"] == XSS_PROMPT

    sheet = (out_dir / "index.html").read_text()
    assert "<script>" not in sheet
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; a fox" in sheet
    assert '<img src="000000.png"' in sheet and '<img src="000002.png"' in sheet
    assert "render-error: RuntimeError: &lt;boom&gt;" in sheet
    assert "offload&lt;1&gt;" in sheet and "seed 2" in sheet


def test_collect_of_a_batch_without_results_still_writes_a_manifest(cli, tmp_path):
    batch_id = cli("submit", prompts(tmp_path, "a fox"))[1].strip()
    out_dir = tmp_path / "out"
    assert cli("collect", batch_id, "--out", out_dir)[0] == 0
    rows = [json.loads(line) for line in (out_dir / "manifest.jsonl").read_text().splitlines()]
    assert [(r["status"], r["png"]) for r in rows] == [("queued", None)]


# Retry
def test_retry_failed_queues_only_the_failed_jobs_again(cli, tmp_path, redis_client):
    batch_id = cli("submit", prompts(tmp_path, "a fox", "an owl"))[1].strip()
    ledger = Ledger(redis_client)
    [queue] = [q.decode() for q in redis_client.keys("zfarm.*")]
    for raw in redis_client.lrange(queue, 0, -1):
        _, kwargs, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
        job = Job.from_wire(kwargs["job"])
        ledger.start(job, "w")
        ledger.finish(job.batch_id, job.index, "failed" if job.index == 1 else "done",
                      {"kind": "render-error", "message": "x"})
    redis_client.delete(queue)
    code, out, err = cli("retry", batch_id, "--failed")
    assert (code, out.strip()) == (0, "1")
    status = json.loads(cli("status", batch_id, "--json")[1])
    assert (status["done"], status["failed"], status["waiting_for_worker"] + status["queued"]) == (1, 0, 1)
    assert redis_client.llen(queue) == 1  # the batch's own lane


def test_retry_of_a_cancelled_batch_is_refused_and_queues_nothing(cli, tmp_path, redis_client):
    batch_id = cli("submit", prompts(tmp_path, "a fox", "an owl"))[1].strip()
    ledger = Ledger(redis_client)
    [queue] = [q.decode() for q in redis_client.keys("zfarm.*")]
    raw = redis_client.lrange(queue, 0, -1)[-1]   # the first pushed: one job starts and fails
    job = Job.from_wire(json.loads(base64.b64decode(json.loads(raw)["body"]))[1]["job"])
    ledger.start(job, "w")
    ledger.finish(job.batch_id, job.index, "failed", {"kind": "render-error", "message": "x"})
    assert cli("cancel", batch_id)[1].strip() == "1"
    queued_before = redis_client.llen(queue)

    code, out, err = cli("retry", batch_id, "--failed")
    assert code != 0 and out == "" and f"batch {batch_id} was cancelled" in err
    status = json.loads(cli("status", batch_id, "--json")[1])
    assert (status["failed"], status["cancelled"], status["queued"]) == (1, 1, 0)
    assert redis_client.llen(queue) == queued_before


def test_retry_needs_the_failed_flag(cli):
    code, _, err = cli("retry", "20240101-000000-abcdef")
    assert code == 2 and "--failed" in err


# Workers
def test_workers_lists_live_workers_with_their_stats(cli, redis_client):
    registry.register(redis_client, {"name": "zimage-24g@gpu1", "host": "gpu1", "gpu": "RTX 4090",
                                     "vram_gb": 23.6, "vram_class": 24, "profile": "resident",
                                     "max_pixels": 4194304}, ttl_s=60)
    redis_client.hincrby(keys.worker_stats("zimage-24g@gpu1"), "jobs_done", 1)  # as Ledger.finish counts
    registry.record_render_time(redis_client, "zimage-24g@gpu1", 3.0)
    workers = json.loads(cli("workers", "--json")[1])
    assert len(workers) == 1
    w = workers[0]
    assert {k: w[k] for k in ("name", "host", "gpu", "vram_gb", "vram_class", "profile", "jobs_done",
                              "jobs_failed", "s_per_image")} == {
        "name": "zimage-24g@gpu1", "host": "gpu1", "gpu": "RTX 4090", "vram_gb": 23.6, "vram_class": 24,
        "profile": "resident", "jobs_done": 1, "jobs_failed": 0, "s_per_image": 3.0}
    assert w["last_seen"] > time.time() - 60
    out = cli("workers")[1].splitlines()
    assert out[0].split("\t")[:3] == ["name", "host", "gpu"] and out[1].startswith("zimage-24g@gpu1\tgpu1")


def _on_a_terminal(args: list[str]) -> str:
    """Run `zfarm ARGS` with its stdout on a pseudo-terminal, as a person at a shell sees it."""
    import pty

    controller, terminal = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", *args], stdout=terminal, stderr=subprocess.PIPE,
                            env=env)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed: the command has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(60)
    os.close(controller)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_workers_shows_last_seen_as_an_age_on_a_terminal(redis_server, redis_client):
    registry.register(redis_client, {"name": "zimage-24g@gpu1", "host": "gpu1", "gpu": "RTX 4090",
                                     "vram_gb": 23.6, "vram_class": 24, "profile": "resident",
                                     "max_pixels": 4194304}, ttl_s=600)
    seen = time.time() - 300
    redis_client.hset(keys.worker("zimage-24g@gpu1"), "last_seen", str(seen))
    header, row = _on_a_terminal(["--redis-url", redis_server, "workers"]).splitlines()
    assert header.split()[-1] == "LAST_SEEN" and row.endswith("5 min ago")
    assert str(int(seen)) not in row


def test_workers_json_keeps_last_seen_as_an_epoch(cli, redis_client):
    registry.register(redis_client, {"name": "w@h", "vram_class": 24, "max_pixels": 4194304}, ttl_s=60)
    seen = time.time() - 3
    redis_client.hset(keys.worker("w@h"), "last_seen", str(seen))
    [worker] = json.loads(cli("workers", "--json")[1])
    assert worker["last_seen"] == pytest.approx(seen)
    assert cli_module._age(3.2) == "3 s ago" and cli_module._age(7300) == "2 h ago"


# Profiles
TABLE = {"runs": [{"profile": "resident", "ok": True, "s_per_image": 3.0, "peak_reserved_gib": 20.0,
                   "cap_gib": 23.0, "host_rss_gib": 10.0, "max_pixels": 4194304}], "source": "test"}


def test_profiles_json_shows_every_class_and_the_cpu_choice_by_default(tmp_path, monkeypatch, capsys):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(TABLE))
    monkeypatch.setenv("ZFARM_PROFILE_TABLE", str(path))
    assert main(["profiles", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["vram_class"] for r in report["classes"]] == [8, 12, 16, 24, 48, 80, "cpu"]
    assert report["chosen"]["vram_class"] == "cpu"
    assert main(["profiles", "--vram-gb", "24", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chosen"]["profile"] == "resident"


def test_profiles_for_a_card_no_profile_fits_says_why():
    report = profiles_report(TABLE, 8, None)
    assert report["chosen"] is None and "no measured profile fits class 8g" in report["error"]


def test_profiles_below_the_smallest_class_is_a_usage_error(capsys):
    assert main(["profiles", "--vram-gb", "4"]) == 2
    assert capsys.readouterr().err == "zfarm: --vram-gb 4 is below the smallest class (8 GB)\n"


# Commands run by the worker side
@pytest.mark.parametrize("argv, expected", [
    (["worker", "--name", "a", "--simulate", "0.1"],
     ["-m", "worker", "--redis-url", "redis://elsewhere:6379/1", "--name", "a", "--simulate", "0.1"]),
    (["worker", "--help"], ["-m", "worker", "--redis-url", "redis://elsewhere:6379/1", "--help"]),
    (["tiny-model", "some/dir"], ["-m", "worker.engine.tiny", "some/dir"]),
    (["fetch-model", "--model", "x/y"], ["-m", "worker.engine.fetch", "--model", "x/y"]),
])
def test_worker_side_commands_exec_python_with_the_global_options_as_flags(monkeypatch, argv, expected):
    execs = []
    monkeypatch.setattr(cli_module, "_exec", execs.append)
    monkeypatch.setenv("ZFARM_REDIS_URL", "placeholder")  # restored after the test
    assert main(["--redis-url", "redis://elsewhere:6379/1", *argv]) == 0
    assert execs == [[sys.executable, *expected]]
    assert os.environ["ZFARM_REDIS_URL"] == "placeholder"  # nothing passes through this process's environment


def test_tiny_model_needs_exactly_one_folder(monkeypatch, capsys):
    monkeypatch.setattr(cli_module, "_exec", lambda argv: pytest.fail("must not exec"))
    assert main(["tiny-model"]) == 2
    assert capsys.readouterr().err == "zfarm: usage: zfarm tiny-model DIR\n"


def test_the_producer_never_imports_torch_or_the_worker():
    code = ("import sys, producer.cli, producer.api, producer.files, producer.progress, producer.demo\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'worker', 'diffusers', 'celery'))\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"


# Progress
class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def status_of(done, failed=0, total=10, running=0, finished=False):
    return {"batch_id": "b", "total": total, "done": done, "failed": failed, "cancelled": 0,
            "running": running, "waiting_for_worker": 0, "finished": finished}


def test_the_progress_bar_redraws_one_line_with_counts_and_an_eta():
    stream, clock = io.StringIO(), FakeClock()
    bar = Progress(stream, tty=True, clock=clock)
    bar(status_of(0))
    clock.now += 10
    bar(status_of(4, failed=1, running=2))
    bar.close()
    frames = stream.getvalue().split("\r")[1:]
    assert "0/10" in frames[0] and "ETA --:--" in frames[0]
    # 5 jobs in 10 s, 5 to go: 10 s left.
    assert "5/10 4 done, 1 failed, 2 running ETA 00:10" in frames[1]
    assert frames[1].startswith("[" + "#" * 5) and stream.getvalue().endswith("\n")


def test_piped_progress_prints_a_line_only_when_something_changed():
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(stream, tty=False, clock=clock)
    for seconds, done in ((0, 0), (1, 0), (11, 3), (12, 4), (13, 10)):
        clock.now = 100 + seconds
        progress(status_of(done, finished=done == 10))
    assert stream.getvalue().splitlines() == ["b: 0/10 (0 done, 0 failed, 0 running)",
                                              "b: 3/10 (3 done, 0 failed, 0 running)",
                                              "b: 10/10 (10 done, 0 failed, 0 running)"]


def test_durations_read_as_clock_times():
    assert [format_duration(s) for s in (None, 5, 75, 3725)] == ["--:--", "00:05", "01:15", "1:02:05"]


def test_collect_downloads_from_s3_compatible_storage(redis_server, tmp_path, monkeypatch, capsys, free_port):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{free_port}"
        for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                            "AWS_DEFAULT_REGION": "us-east-1", "ZFARM_S3_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(name, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="renders")
        storage_url = "s3://renders/farm-a"
        stand_in = StandInWorker(redis_server, storage_url)
        stand_in.start()
        try:
            args = ["--redis-url", redis_server, "--storage-url", storage_url]
            out_dir = tmp_path / "out"
            assert main([*args, "submit", prompts(tmp_path, "a fox", "an owl"), "--wait", "--timeout", "30",
                         "--out", str(out_dir)]) == 0
        finally:
            stand_in.stop()
        assert "collected 2 of 2 images" in capsys.readouterr().err
        assert (out_dir / "000001.png").read_bytes() == b"\x89PNG fake"
        assert json.loads((out_dir / "000001.json").read_text())["prompt"] == "an owl"
    finally:
        server.stop()
