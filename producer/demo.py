"""`zfarm demo`: the whole farm on one machine, with nothing installed beyond the Python packages.

It starts a Redis (a `redis-server` from PATH, else fakeredis's TCP server in this process), keeps
results in `./zfarm-demo/results`, builds the tiny random-weight model once (unless ZFARM_MODEL
names one), runs one worker subprocess, submits a few small prompts, shows progress, collects the
results with a contact sheet, then stops the worker and the server.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import redis

from producer.api import Farm
from producer.progress import Progress
from shared import registry
from shared.errors import DemoError
from shared.settings import DEFAULT_MODEL, Settings

DEMO_PROMPTS = ("a cat in the neon city at night", "an old man by the river, watercolor style",
                "a lantern on a stone bridge in the fog", "a red flower in a glass, studio light")
DEMO_SIDE_PX = 256  # small, so a CPU renders each image in seconds
WORKER_NAME = "demo"
SERVER_START_TIMEOUT_S = 15.0
# Importing torch and diffusers and loading the model on a slow CPU takes a while the first time.
WORKER_READY_TIMEOUT_S = 300.0
BATCH_TIMEOUT_S = 600.0
WORKER_STOP_TIMEOUT_S = 60.0
LOG_TAIL_CHARS = 3000
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # holds producer/, shared/, worker/




def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_ping(url: str, timeout_s: float, alive=lambda: True) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if not alive() or time.monotonic() > deadline:
                    raise DemoError(f"the demo Redis at {url} did not answer within {timeout_s:g} s") from None
                time.sleep(0.05)
    finally:
        client.close()


@contextmanager
def redis_server_process(binary: str, workdir: Path):
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for_ping(url, SERVER_START_TIMEOUT_S, alive=lambda: process.poll() is None)
        yield url
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def fake_redis_server():
    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, name="zfarm-demo-redis", daemon=True)
    thread.start()
    url = f"redis://127.0.0.1:{server.server_address[1]}/0"
    try:
        _wait_for_ping(url, SERVER_START_TIMEOUT_S)
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def local_redis(workdir: Path):
    """A context manager yielding the URL of a Redis for this demo only."""
    binary = shutil.which("redis-server")
    if binary:
        _say(f"demo: starting {binary} on a free port")
        return redis_server_process(binary, workdir)
    _say("demo: no redis-server on PATH; starting fakeredis's server in this process")
    return fake_redis_server()


def _child_env() -> dict:
    """The environment of the demo's child processes: this one's, made to find zfarm and flush output.
    zfarm's own settings go to them as flags."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # `python -m worker` must find the package next to this one, installed or run from a checkout.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def ensure_tiny_model(folder: Path) -> Path:
    if (folder / "model_index.json").exists():
        _say(f"demo: using the tiny model in {folder}")
        return folder
    _say(f"demo: building the tiny random-weight model in {folder} (once)")
    done = subprocess.run([sys.executable, "-m", "worker.engine.tiny", str(folder)], env=_child_env(),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise DemoError(f"building the tiny model failed ({done.returncode}):\n{done.stderr[-LOG_TAIL_CHARS:]}")
    return folder


class WorkerProcess:
    def __init__(self, settings: Settings, log_path: Path):
        self.log_path = log_path
        self.log = open(log_path, "ab")
        args = ["--name", WORKER_NAME, "--redis-url", settings.redis_url, "--storage-url", settings.storage_url,
                "--model", settings.model]
        self.process = subprocess.Popen([sys.executable, "-m", "worker", *args], env=_child_env(),
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]

    def stop(self) -> int:
        """SIGTERM (the worker hands back or finishes its job), then wait; SIGKILL only if it hangs."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(WORKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _say(f"demo: the worker did not stop within {WORKER_STOP_TIMEOUT_S:g} s; killing it")
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.log.close()
        return self.process.returncode


def wait_for_worker(farm: Farm, worker: WorkerProcess, timeout_s: float) -> dict:
    """The demo worker's registry entry once it reports ready (model loaded)."""
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        if not worker.alive():
            raise DemoError(f"the worker exited with {worker.process.returncode}; its log "
                            f"({worker.log_path}) ends:\n{worker.log_tail()}")
        mine = [w for w in registry.live_workers(farm.redis) if w.get("name", "").startswith(WORKER_NAME + "@")]
        if mine and mine[0].get("state") == "ready":
            return mine[0]
        if mine and not announced:
            _say(f"demo: worker {mine[0]['name']} registered ({mine[0].get('gpu')}, profile "
                 f"{mine[0].get('profile')}); loading the model")
            announced = True
        if time.monotonic() > deadline:
            raise DemoError(f"the worker was not ready within {timeout_s:g} s; see {worker.log_path}")
        time.sleep(0.25)


def run(workdir: str = "zfarm-demo", redis_url: str | None = None, storage_url: str | None = None) -> int:
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    storage_url = storage_url or (work / "results").as_uri()
    try:
        with ExitStack() as stack:
            if not redis_url:
                redis_url = stack.enter_context(local_redis(work))
            settings = Settings.from_env(redis_url=redis_url, storage_url=storage_url)
            # The demo renders the tiny model unless ZFARM_MODEL names another one.
            tiny = settings.model == DEFAULT_MODEL
            if tiny:
                settings = settings.replace(model=str(ensure_tiny_model(work / "tiny-model")))
            _say(f"demo: starting a worker (log: {work / 'worker.log'})")
            worker = WorkerProcess(settings, work / "worker.log")
            stack.callback(lambda: _say(f"demo: worker stopped ({worker.stop()})"))

            farm = Farm(settings)
            info = wait_for_worker(farm, worker, WORKER_READY_TIMEOUT_S)
            _say(f"demo: worker {info['name']} is ready")
            batch = farm.submit([{"prompt": p, "seed": seed} for seed, p in enumerate(DEMO_PROMPTS, 1)],
                                defaults={"width": DEMO_SIDE_PX, "height": DEMO_SIDE_PX}, name=None)
            _say(f"demo: submitted {len(DEMO_PROMPTS)} prompts as batch {batch.id}")
            progress = Progress(sys.stderr)
            try:
                status = batch.wait(timeout_s=BATCH_TIMEOUT_S, on_progress=progress)
            finally:
                progress.close()
            summary = batch.collect(str(work / "out"))
            if not status["finished"]:
                _say(f"demo: the batch did not finish within {BATCH_TIMEOUT_S:g} s")
            for failure in status["failures"]:
                _say(f"demo: job {failure['index']} failed: {failure.get('kind')}: {failure.get('message')}")
            if tiny:
                _say("demo: the tiny model has random weights: the images are NOISE, by design. "
                     "Set ZFARM_MODEL to a real Z-Image-Turbo to render pictures.")
            print(summary["index_html"])
            ok = status["finished"] and status["done"] == status["total"]
            return 0 if ok else 1
    except DemoError as exc:
        _say(f"zfarm demo: {exc}")
        return 1
