"""Worker metrics recorded in pool children are scraped from the parent's HTTP endpoint.

Each scenario runs in a fresh interpreter, as a worker parent would: `metrics.start` switches the
whole process to prometheus_client's multiprocess mode and sets PROMETHEUS_MULTIPROC_DIR, which
must not leak into the test process or the workers other tests start.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]


def scrape(port: int, timeout_s: float = 10.0) -> dict:
    """{(sample name, sorted labels): value} from the endpoint, retrying until it answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def wait_for(port: int, key: tuple, expected: float, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(port)
        if samples.get(key) == expected or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def env_without_multiproc_dir() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


PARENT_SCRIPT = textwrap.dedent("""
    import multiprocessing, sys
    import prometheus_client  # imported first, as the `celery` command does through Flower's plugin
    from worker import metrics

    metrics.start(int(sys.argv[1]), addr="127.0.0.1")

    def render_in_child(seconds):
        metrics.observe_render(24, "full", seconds)
        metrics.count_failed(24, "full", "render_error")
        metrics.count_oom_stepdown(24, "full", "te_offload")
        metrics.count_upload_retry()
        metrics.set_peak_vram(24, 21.5)

    # Two children one after the other, as when the pool replaces a child.
    for seconds in (1.5, 4.0):
        child = multiprocessing.get_context("fork").Process(target=render_in_child, args=(seconds,))
        child.start()
        child.join()
        assert child.exitcode == 0
    print("ready", flush=True)
    sys.stdin.read()
""")


def test_metrics_recorded_in_forked_children_are_served_by_the_parent(free_port):
    port = free_port
    parent = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT, str(port)], cwd=REPO,
                              env=env_without_multiproc_dir(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        samples = scrape(port)
    finally:
        parent.stdin.close()
        parent.wait(timeout=10)
    labels = (("profile", "full"), ("vram_class", "24g"))
    assert samples[("zfarm_images_rendered_total", labels)] == 2
    assert samples[("zfarm_render_seconds_count", labels)] == 2
    assert samples[("zfarm_render_seconds_sum", labels)] == pytest.approx(5.5)
    assert samples[("zfarm_render_seconds_bucket", (("le", "2.0"),) + labels)] == 1
    assert samples[("zfarm_jobs_failed_total",
                    (("profile", "full"), ("reason", "render_error"), ("vram_class", "24g")))] == 2
    assert samples[("zfarm_oom_stepdowns_total",
                    (("from_profile", "full"), ("to_profile", "te_offload"), ("vram_class", "24g")))] == 2
    assert samples[("zfarm_upload_retries_total", ())] == 2
    assert samples[("zfarm_peak_vram_gib", (("vram_class", "24g"),))] == 21.5


def run_script(script: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO,
                          env=env_without_multiproc_dir(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_metrics_directory_is_made_by_start_and_removed_when_the_parent_exits(free_port):
    made = Path(run_script(f"""
        import os
        from worker import metrics
        metrics.start({free_port}, addr="127.0.0.1")
        print(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    """).strip())
    assert made.name.startswith("zfarm-metrics-")
    assert not made.exists()


def test_importing_the_module_changes_nothing_so_flower_can_load_the_tasks():
    out = run_script("""
        import os
        from prometheus_client import values
        from worker import metrics
        print("PROMETHEUS_MULTIPROC_DIR" in os.environ, values.ValueClass._multiprocess)
    """)
    assert out.split() == ["False", "False"]


def test_port_zero_serves_nothing_and_recording_still_works_in_process():
    out = run_script("""
        import os
        from worker import metrics
        assert metrics.start(0) is False
        metrics.observe_render("cpu", "cpu", 30.0)
        print("PROMETHEUS_MULTIPROC_DIR" in os.environ,
              metrics._families().images_rendered.labels("cpu", "cpu")._value.get())
    """)
    assert out.split() == ["False", "1.0"]


def test_a_port_in_use_is_logged_and_the_worker_goes_on(free_port):
    out = run_script(f"""
        import logging, socket
        from worker import metrics
        logging.basicConfig(level=logging.ERROR, format="%(message)s")
        busy = socket.socket(); busy.bind(("127.0.0.1", {free_port})); busy.listen()
        print(metrics.start({free_port}, addr="127.0.0.1"))
        metrics.count_upload_retry()
    """)
    assert out.strip() == "False"


CELERY_APP = textwrap.dedent("""
    import os
    from celery import Celery
    from celery.signals import worker_init
    from worker import metrics

    app = Celery("metrics_probe", broker=os.environ["PROBE_BROKER"])
    app.conf.update(task_serializer="json", accept_content=["json"], worker_hijack_root_logger=False)

    @worker_init.connect
    def serve_metrics(**_):
        metrics.start(int(os.environ["PROBE_METRICS_PORT"]), addr="127.0.0.1")

    @app.task(name="probe.render")
    def render(seconds):
        metrics.observe_render(16, "te_offload", seconds)
        return os.getpid()
""")


@pytest.mark.slow
def test_a_celery_prefork_worker_exports_what_its_pool_child_recorded(tmp_path, redis_server, free_port):
    (tmp_path / "probe_app.py").write_text(CELERY_APP)
    port = free_port
    env = env_without_multiproc_dir()
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), env["PYTHONPATH"]]),
               PROBE_BROKER=redis_server, PROBE_METRICS_PORT=str(port))
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "probe_app", "worker", "--pool=prefork",
         "--concurrency=1", "--loglevel=WARNING", "--without-gossip", "--without-mingle",
         "--without-heartbeat"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        sender = subprocess.run(
            [sys.executable, "-c", "import probe_app; probe_app.render.delay(2.5)"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert sender.returncode == 0, sender.stderr
        key = ("zfarm_images_rendered_total", (("profile", "te_offload"), ("vram_class", "16g")))
        samples = wait_for(port, key, 1.0)
    finally:
        worker.terminate()
        _, stderr = worker.communicate(timeout=30)
    assert samples.get(key) == 1.0, stderr
    assert samples[("zfarm_render_seconds_sum", key[1])] == pytest.approx(2.5)
