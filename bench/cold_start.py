"""Cold-start benchmark of a real `zfarm worker` (a measuring tool, not a test).

From `zfarm worker` start to the first image stored, weights already on local disk, compilation
included; the worker must report itself `loading` and take no job before it is `ready`.

Each start, in a fresh temporary folder:
  1. a private redis-server on a free port (`--redis-server`; a `lib/` folder beside it, or `--redis-lib`,
     goes on that process's LD_LIBRARY_PATH only) and file:// storage;
  2. ONE job (default 1024x1024, 8 steps) submitted through `producer.api.Farm` with `allow_pending`,
     before any worker is live, so it waits in its queue;
  3. optionally `sync; echo 3 > /proc/sys/vm/drop_caches` (root only; whether it worked is recorded), so
     the weights come from disk rather than the page cache;
  4. `python -m producer.cli worker ARGS` (what `zfarm worker` runs) with ZFARM_REDIS_URL,
     ZFARM_STORAGE_URL, ZFARM_MODEL and ZFARM_COMPILE_CACHE_DIR; the clock starts just before it;
  5. polling (every `--poll-s`, up to `--timeout-s`) of the worker registry and the job: seconds to the
     registration in state `loading`, to state `ready`, to the message leaving its queue, to the job
     started in the ledger, and to the job done with its PNG in storage;
  6. SIGTERM to the worker, wait for it to exit, stop redis.

`claimed_before_ready` is true when a poll saw the message taken (or the job started) while the
registry still said `loading`, or when the worker's log shows `Task ... received` before the line
saying it consumes its queues. (The ledger keeps no start time: `attempts` and `states` are polled.)

`--runs N` repeats the whole start with the same compile cache folder; `--fresh-cache` empties it
before the first start. Each record says `cache: "empty"` when the folder held no file before that
start, else `"warm"`, with the file count and size before and after. Unless `--share-default-caches`,
each start gets a private TMPDIR and TRITON_HOME, so compiled artifacts the worker leaves in torch's
and triton's default places (`$TMPDIR/torchinductor_$USER`, `~/.triton`) do not warm the next start:
only what goes to ZFARM_COMPILE_CACHE_DIR carries over, as it would across real restarts of a worker
whose temporary folder is wiped.

  python -m bench.cold_start MODEL_DIR [--vram-gb 24] [--profile NAME] [--runs 3] [--fresh-cache]
         [--compile-cache-dir DIR] [--size 1024] [--drop-page-cache] [--jsonl FILE] [-- WORKER ARGS...]

One JSON line per start on stdout (appended to `--jsonl`); progress and log tails on stderr. Exit 0
when every start stored its image, started no job before ready, and the worker exited on SIGTERM.
Times `to_*_s` count from the worker's process start. `load_s` is the registry's (the whole renderer
load in the rendering process: imports, weights, profile, warm-up); `renderer_load_s` and
`renderer_warmup_s` (and `renderer_load_stages_s`: imports, CUDA init, read, place, warm-up) are the renderer's own split, read from its "renderer ready" log line; `render_s`
is the first job's, from its sidecar.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.host_memory import drop_page_cache  # noqa: E402
from shared import keys  # noqa: E402

SIZE_PX = 1024
STEPS = 8
SEED = 7
PROMPT = ("a cinematic photo of an old man with a red lantern on a stone bridge in a chinese traditional "
          "garden at night , rain and fog , neon light on the river , soft shadow , high definition 8k")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Worker log lines (Celery's and zfarm's) that order a job's receipt against readiness.
RECEIVED_LINE = re.compile(r"Task zfarm\.render\[[^\]]+\] received")
CONSUMES_LINE = re.compile(r"zfarm worker \S+ consumes \d+ queues")
READY_LINE = re.compile(r"zfarm: renderer ready in (?P<seconds>[\d.]+) s \((?P<described>\{.*\})\)\s*$", re.M)
LOG_TAIL_CHARS = 3000
# The headline of each record, in this order; the details follow.
FIELDS_FIRST = ("run", "ok", "error", "model", "device", "vram_class", "profile", "cache", "page_cache_dropped",
                "to_loading_s", "to_ready_s", "to_first_image_s", "render_s", "load_s", "warmup_s",
                "claimed_before_ready", "torch", "diffusers", "date")


def _say(message: str) -> None:
    print(f"cold_start: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server without persistence (as tests/farm.py starts one, with a chosen binary)."""

    def __init__(self, binary: str, workdir: Path, lib_dir: str | None = None):
        found = shutil.which(binary)
        if found is None:
            raise SystemExit(f"cold_start: no redis-server at {binary!r} (give --redis-server PATH)")
        self.binary, self.workdir, self.lib_dir = found, workdir, lib_dir
        self.port = free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        env = dict(os.environ)
        if self.lib_dir:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (self.lib_dir, env.get("LD_LIBRARY_PATH")) if p)
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "wb")
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = (self.workdir / "redis.log").read_text(errors="replace")[-1000:]
                self.stop()
                raise SystemExit(f"cold_start: redis-server did not answer PING: {text}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def folder_stats(path: Path) -> tuple[int, float]:
    """(files, MiB) under `path`."""
    files, size = 0, 0
    if path.is_dir():
        for p in path.rglob("*"):
            if p.is_file() and not p.is_symlink():
                files += 1
                size += p.stat().st_size
    return files, round(size / 2**20, 1)


def empty_folder(path: Path) -> None:
    resolved = path.expanduser().resolve()
    if resolved in (Path("/"), Path.home().resolve(), ROOT):
        raise SystemExit(f"cold_start: refusing to empty {resolved}")
    if resolved.exists():
        shutil.rmtree(resolved)
    resolved.mkdir(parents=True)


def submit_one(redis_url: str, storage_url: str, size: int, steps: int):
    """The job, queued before any worker is live. Returns (batch, its queue)."""
    from producer.api import Farm

    farm = Farm.from_env(redis_url=redis_url, storage_url=storage_url, redis_retry_s=5)
    batch = farm.submit([{"prompt": PROMPT, "width": size, "height": size, "steps": steps, "seed": SEED}],
                        name="cold-start", allow_pending=True)
    (queue,) = batch.queues
    return batch, queue


class Poller:
    """Reads the registry entry of one worker (by pid) and the state of job 0, one round trip a poll."""

    def __init__(self, client: redis.Redis, pid: int, batch_id: str, queue: str):
        self.client, self.pid, self.batch_id, self.queue = client, pid, batch_id, queue
        self.name = None

    def _find_name(self) -> str | None:
        names = sorted(n.decode() for n in self.client.smembers(keys.WORKERS))
        if not names:
            return None
        pids = self.client.pipeline(transaction=False)
        for name in names:
            pids.hget(keys.worker(name), "pid")
        for name, pid in zip(names, pids.execute()):
            if pid is not None and pid.decode() == str(self.pid):
                return name
        return None

    def poll(self) -> dict:
        if self.name is None:
            self.name = self._find_name()
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(keys.worker(self.name or "-"), "state")
            pipe.hget(keys.batch_states(self.batch_id), 0)
            pipe.hget(keys.batch_attempts(self.batch_id), 0)
            pipe.llen(self.queue)
            state, job_state, attempts, queued = pipe.execute()
        return {"state": state.decode() if state else None, "job": job_state.decode() if job_state else None,
                "attempts": int(attempts or 0), "queued": int(queued)}

    def registration(self) -> dict:
        if self.name is None:
            return {}
        from shared.registry import _decode

        return _decode(self.client.hgetall(keys.worker(self.name)))


def renderer_facts(text: str) -> dict:
    """The renderer's own account of its load (`describe()` in worker.loading's "renderer ready" line)."""
    match = READY_LINE.search(text)
    if not match:
        return {}
    out = {"renderer_ready_s": float(match["seconds"])}
    try:
        described = ast.literal_eval(match["described"])
    except (ValueError, SyntaxError):
        return out
    if isinstance(described, dict):
        out.update({f"renderer_{k}": described[k] for k in ("load_s", "warmup_s", "load_stages_s", "warmup_compile",
                                                               "compile_cache_dir", "applied")
                    if k in described})
    return out


def log_order(text: str) -> dict:
    """Whether the worker's log shows the job received before it said it consumes its queues."""
    received = RECEIVED_LINE.search(text)
    consumes = CONSUMES_LINE.search(text)
    return {"received_at_char": received.start() if received else None,
            "consumes_at_char": consumes.start() if consumes else None,
            "received_before_consuming": bool(received and (consumes is None or received.start() < consumes.start()))}


def _first(events: dict, name: str, t: float) -> None:
    if events.get(name) is None:
        events[name] = round(t, 3)


def stop_worker(proc: subprocess.Popen, timeout_s: float) -> tuple[int | None, float | None]:
    """SIGTERM, wait; kill the worker's own process group if it does not exit. (returncode, seconds)."""
    if proc.poll() is not None:
        return proc.returncode, None
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
        return proc.returncode, round(time.monotonic() - t0, 2)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker was started in a session of its own
        proc.wait(10)
        return None, None


def one_start(args, run: int, worker_args: list[str], cache_dir: Path) -> dict:
    files_before, mib_before = folder_stats(cache_dir)
    record = {"run": run, "model": str(args.model_dir), "profile": args.profile, "vram_class": None,
              "cache": "empty" if files_before == 0 else "warm", "compile_cache_dir": str(cache_dir),
              "cache_files_before": files_before, "cache_mib_before": mib_before,
              "default_caches": "shared" if args.share_default_caches else "isolated",
              "page_cache_dropped": None, "size": args.size, "steps": args.steps,
              "worker_args": worker_args, "ok": False, "error": None,
              "to_registered_s": None, "to_loading_s": None, "to_ready_s": None, "to_taken_s": None,
              "to_started_s": None, "to_first_image_s": None, "render_s": None, "load_s": None,
              "warmup_s": None, "claimed_before_ready": None, "device": None,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="zfarm-cold-start-") as tmp:
        work = Path(tmp)
        server = RedisServer(args.redis_server, work / "redis", args.redis_lib).start()
        proc = None
        log_path = work / "worker.log"
        try:
            storage_root = work / "results"
            storage_url = f"file://{storage_root}"
            batch, queue = submit_one(server.url, storage_url, args.size, args.steps)
            record["batch_id"] = batch.id
            if args.drop_page_cache:
                record["page_cache_dropped"], why = drop_page_cache()
                if not record["page_cache_dropped"]:
                    record["page_cache_error"] = why or "failed"
            else:
                record["page_cache_dropped"] = False
            env = dict(os.environ)
            env.update({"ZFARM_REDIS_URL": server.url, "ZFARM_STORAGE_URL": storage_url,
                        "ZFARM_MODEL": str(args.model_dir), "ZFARM_COMPILE_CACHE_DIR": str(cache_dir),
                        "PYTHONUNBUFFERED": "1"})
            env.setdefault("HF_HUB_OFFLINE", "1")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
            if not args.share_default_caches:
                private = work / "worker-tmp"
                private.mkdir()
                env["TMPDIR"] = env["TRITON_HOME"] = str(private)
            cmd = [sys.executable, "-m", "producer.cli", "worker", *worker_args]
            with open(log_path, "wb") as log:
                t0_wall = time.time()
                t0 = time.monotonic()
                proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            client = redis.Redis.from_url(server.url)
            poller = Poller(client, proc.pid, batch.id, queue)
            events: dict = {}
            seen_ready = False
            claimed_early = False
            deadline = t0 + args.timeout_s
            png_path = storage_root / batch.id / "000000.png"
            while True:
                snap = poller.poll()
                t = time.monotonic() - t0
                if snap["state"] is not None:
                    _first(events, "to_registered_s", t)
                    record.setdefault("first_state", snap["state"])
                if snap["state"] == "loading":
                    _first(events, "to_loading_s", t)
                if snap["state"] == "ready":
                    _first(events, "to_ready_s", t)
                    seen_ready = True
                taken = snap["queued"] == 0
                started = snap["attempts"] > 0 or snap["job"] is not None
                if taken:
                    _first(events, "to_taken_s", t)
                if started:
                    _first(events, "to_started_s", t)
                if (taken or started) and not seen_ready:
                    claimed_early = True
                if snap["job"] == "done" and png_path.is_file():
                    _first(events, "to_first_image_s", t)
                    break
                if snap["job"] in ("failed", "cancelled"):
                    failure = client.hget(keys.batch_failures(batch.id), 0)
                    record["error"] = f"job {snap['job']}: {failure.decode() if failure else '?'}"
                    break
                if snap["state"] == "failed":
                    record["error"] = f"worker failed to load: {poller.registration().get('error', '?')}"
                    break
                if proc.poll() is not None:
                    record["error"] = f"worker exited {proc.returncode} before the image was stored"
                    break
                if time.monotonic() > deadline:
                    record["error"] = f"timed out after {args.timeout_s:g} s"
                    break
                time.sleep(args.poll_s)
            record.update(events)
            reg = poller.registration()
            record["worker"] = poller.name
            record["to_celeryd_init_s"] = (round(float(reg["started_at"]) - t0_wall, 3)
                                           if reg.get("started_at") else None)
            record["vram_class"] = reg.get("vram_class")
            record["profile"] = reg.get("profile", record["profile"])
            record["device"] = reg.get("gpu")
            for field in ("load_s", "warmup_s", "compile_s"):
                if reg.get(field) not in (None, ""):
                    record[field] = float(reg[field])
            versions = reg.get("versions") if isinstance(reg.get("versions"), dict) else {}
            sidecar_path = storage_root / batch.id / "000000.json"
            if sidecar_path.is_file():
                sidecar = json.loads(sidecar_path.read_text())
                record["render_s"] = sidecar.get("render_s")
                record["applied"] = sidecar.get("applied")
                record["peak_vram_gib"] = sidecar.get("peak_vram_gib")
                record["profile"] = sidecar.get("profile", record["profile"])
                versions = {**versions, **(sidecar.get("versions") or {})}
                for field in ("load_s", "warmup_s"):
                    if record.get(field) is None and sidecar.get(field) is not None:
                        record[field] = sidecar[field]
            record.update({k: versions.get(k) for k in ("torch", "diffusers", "transformers", "cuda")
                           if versions.get(k)})
            if png_path.is_file():
                data = png_path.read_bytes()
                record["png_bytes"] = len(data)
                record["png_ok"] = data.startswith(PNG_MAGIC)
            else:
                record["png_ok"] = False
            record["stop_rc"], record["stop_s"] = stop_worker(proc, args.stop_timeout_s)
            text = log_path.read_text(errors="replace")
            order = log_order(text)
            record["log_received_before_consuming"] = order["received_before_consuming"]
            record["claimed_before_ready"] = claimed_early or order["received_before_consuming"]
            record.update(renderer_facts(text))
            for field in ("load_s", "warmup_s"):
                if record.get(field) is None and record.get(f"renderer_{field}") is not None:
                    record[field] = record[f"renderer_{field}"]
            record["ok"] = (record["error"] is None and record["png_ok"] and not record["claimed_before_ready"]
                            and record["stop_rc"] is not None)
            if record["stop_rc"] is None and record["error"] is None:
                record["error"] = f"the worker did not exit within {args.stop_timeout_s:g} s of SIGTERM"
            if not record["ok"]:
                _say(f"run {run} failed: {record['error']}; worker log tail:\n{text[-LOG_TAIL_CHARS:]}")
            if args.keep:
                keep = Path(args.keep)
                keep.mkdir(parents=True, exist_ok=True)
                stem = f"cold_start_{time.strftime('%Y%m%d-%H%M%S', time.gmtime(t0_wall))}_run{run}"
                shutil.copy(log_path, keep / f"{stem}.log")
                for path, ext in ((png_path, "png"), (sidecar_path, "json")):
                    if path.is_file():
                        shutil.copy(path, keep / f"{stem}.{ext}")
                        record[f"kept_{ext}"] = str(keep / f"{stem}.{ext}")
                record["kept_log"] = str(keep / f"{stem}.log")
        finally:
            if proc is not None and proc.poll() is None:
                stop_worker(proc, args.stop_timeout_s)
            server.stop()
    record["cache_files_after"], record["cache_mib_after"] = folder_stats(cache_dir)
    inherited = {k: os.environ[k] for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR") if k in os.environ}
    if inherited:  # these win over ZFARM_COMPILE_CACHE_DIR in the worker
        record["inherited_cache_env"] = inherited
    return {**{k: record.get(k) for k in FIELDS_FIRST}, **record}


def split_worker_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this tool's arguments, the worker's extra arguments after `--`)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, extra = split_worker_args(argv)
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.split("\n")[0],
                                     epilog="Arguments after -- go to `zfarm worker` as they are.")
    parser.add_argument("model_dir", help="local model folder (ZFARM_MODEL)")
    parser.add_argument("--vram-gb", type=float, help="passed to the worker: play a card of this class")
    parser.add_argument("--profile", help="passed to the worker: force this profile")
    parser.add_argument("--runs", type=int, default=1, help="starts, one after another, sharing the compile cache")
    parser.add_argument("--compile-cache-dir", default=str(Path(tempfile.gettempdir()) / "zfarm-cold-start-compile"),
                        help="ZFARM_COMPILE_CACHE_DIR of the worker (default: %(default)s)")
    parser.add_argument("--fresh-cache", action="store_true", help="empty the compile cache folder before run 1")
    parser.add_argument("--share-default-caches", action="store_true",
                        help="let the worker use the usual TMPDIR and triton home (default: private ones per start)")
    parser.add_argument("--drop-page-cache", action="store_true",
                        help="drop the page cache before each start (root, writable /proc/sys)")
    parser.add_argument("--size", type=int, default=SIZE_PX, help="square side of the job (default %(default)s)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--redis-server", default="redis-server", help="redis-server binary (default: on PATH)")
    parser.add_argument("--redis-lib", help="LD_LIBRARY_PATH for redis-server only (default: lib/ beside it)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per start, worker start to image stored")
    parser.add_argument("--stop-timeout-s", type=float, default=60.0, help="wait this long for exit after SIGTERM")
    parser.add_argument("--poll-s", type=float, default=0.02)
    parser.add_argument("--jsonl", help="append each record here")
    parser.add_argument("--keep", metavar="DIR", help="copy each start's worker log, PNG and sidecar here")
    args = parser.parse_args(own)
    args.model_dir = Path(args.model_dir).resolve()
    if not (args.model_dir / "model_index.json").is_file():
        parser.error(f"{args.model_dir} holds no model_index.json")
    if args.redis_lib is None:
        found = shutil.which(args.redis_server)
        beside = Path(found).resolve().parent / "lib" if found else None
        args.redis_lib = str(beside) if beside and beside.is_dir() else None
    worker_args = ([] if args.vram_gb is None else ["--vram-gb", f"{args.vram_gb:g}"]) \
        + ([] if args.profile is None else ["--profile", args.profile]) + extra
    cache_dir = Path(args.compile_cache_dir).expanduser().resolve()
    if args.fresh_cache:
        empty_folder(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for run in range(1, args.runs + 1):
        _say(f"run {run}/{args.runs}: worker {' '.join(worker_args) or '(no extra args)'}, cache {cache_dir}")
        record = one_start(args, run, worker_args, cache_dir)
        failures += not record["ok"]
        line = json.dumps(record)
        print(line, flush=True)
        if args.jsonl:
            Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
            with open(args.jsonl, "a") as fh:
                fh.write(line + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
