"""Real processes for the queue tests: redis-server, moto's S3 server, zfarm workers.

Nothing here mocks the broker or boto3: every test that uses these talks to real servers over
TCP, and workers are real `python -m worker` subprocesses.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def workers_blocked_on_job_queues(client: redis.Redis) -> int:
    """Connections blocked in a BRPOP naming many keys: workers idle on their job queues.

    A loading worker blocks in a BRPOP naming only its holding queue (one key, a few bytes of
    arguments), which it ends when ready; job queues are at least a dozen keys."""
    return sum(1 for c in client.client_list()
               if c.get("cmd") == "brpop" and "b" in c.get("flags", "") and int(c.get("argv-mem", 0)) > 100)


class LosesOneReply(redis.Connection):
    """A connection that, once armed with a command name, reads the server's reply to that command and
    then drops the connection, as a Redis killed between running a command and sending its reply does.
    For a MULTI/EXEC the reply cut is EXEC's (the acknowledgements before it go through)."""
    armed: bytes = b""

    def send_packed_command(self, command, *args, **kwargs):
        packed = b"".join(command) if isinstance(command, list) else command
        self.cut_pending = bool(LosesOneReply.armed) and LosesOneReply.armed in packed.upper()
        return super().send_packed_command(command, *args, **kwargs)

    def read_response(self, *args, **kwargs):
        response = super().read_response(*args, **kwargs)
        if getattr(self, "cut_pending", False) and response not in (b"OK", b"QUEUED"):
            LosesOneReply.armed, self.cut_pending = b"", False
            self.disconnect()
            raise redis.ConnectionError("the reply was lost")
        return response


def client_that_loses_one_reply(url: str) -> redis.Redis:
    """A client with shared.redis_conn.connect's kind of retry, on LosesOneReply connections."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, connection_class=LosesOneReply,
                                retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 3),
                                retry_on_error=[redis.ConnectionError])


class RedisServer:
    """A private redis-server on a free port; AOF persistence on request (restart tests)."""

    def __init__(self, workdir: Path, appendonly: bool = False, password: str | None = None,
                 replicaof: "RedisServer | None" = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendonly = appendonly
        self.password = password
        self.replicaof = replicaof
        self.proc = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run the README's test command, which installs it")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.workdir), "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replicaof is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replicaof.port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)

        def pong():
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        wait_for(pong, 10, what="redis-server to answer PING")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


class SentinelGroup:
    """A primary, its replica and three sentinels (quorum 2): Debian's redis-server, the sentinels
    run as `redis-server FILE --sentinel`. One password for all of them, AOF on both data nodes.

    `down_after_ms` is how long the sentinels wait before they call a silent primary down (Redis's
    default is 30 s; the tests use 1 s)."""

    def __init__(self, workdir: Path, password: str = "sentinel-test-pw", master_name: str = "zfarm",
                 down_after_ms: int = 1000, sentinels: int = 3):
        self.workdir = Path(workdir)
        self.password = password
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.primary = RedisServer(self.workdir / "primary", appendonly=True, password=password)
        self.replica = RedisServer(self.workdir / "replica", appendonly=True, password=password,
                                   replicaof=self.primary)
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinel_procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        """ZFARM_REDIS_URL in Celery's Sentinel form: every sentinel, the database at the end."""
        return ";".join(f"sentinel://:{self.password}@127.0.0.1:{port}" for port in self.sentinel_ports) + "/0"

    def start(self) -> "SentinelGroup":
        self.primary.start()
        self.replica.start()
        binary = shutil.which("redis-server")
        for n, port in enumerate(self.sentinel_ports):
            folder = self.workdir / f"sentinel-{n}"
            folder.mkdir(parents=True, exist_ok=True)
            config = folder / "sentinel.conf"  # Sentinel rewrites its own file: a fresh, writable copy
            config.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", f"dir {folder}", f"requirepass {self.password}",
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.primary.port} 2",
                f"sentinel auth-pass {self.master_name} {self.password}",
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.master_name} 10000",
                f"sentinel parallel-syncs {self.master_name} 1", ""]))
            self.sentinel_procs.append(subprocess.Popen([binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL,
                                                        stderr=subprocess.DEVNULL))
        others = len(self.sentinel_ports) - 1

        def settled():
            """Every sentinel sees the primary, its replica in sync, and the other sentinels."""
            try:
                if self.replica.client().info("replication").get("master_link_status") != "up":
                    return False
                for client in self.sentinel_clients():
                    state = client.sentinel_master(self.master_name)
                    if state["num-other-sentinels"] < others or state["num-slaves"] < 1:
                        return False
                return True
            except (redis.ConnectionError, redis.ResponseError):
                return False

        wait_for(settled, 30, interval_s=0.1, what="the sentinels to see the primary, its replica and each other")
        return self

    def sentinel_clients(self) -> list[redis.Redis]:
        return [redis.Redis(host="127.0.0.1", port=port, password=self.password, socket_timeout=2)
                for port in self.sentinel_ports]

    def current_primary_port(self) -> int:
        for client in self.sentinel_clients():
            try:
                return int(client.sentinel_get_master_addr_by_name(self.master_name)[1])
            except (redis.ConnectionError, TypeError):
                continue
        raise RuntimeError("no sentinel answers")

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in (self.primary, self.replica) if s.port == port)

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.replica.kill()
        self.primary.kill()


class S3Server:
    """moto's S3 server in this process (its data survives stop/start on the same port)."""

    def __init__(self, bucket: str = "zfarm"):
        self.port = free_port()
        self.bucket = bucket
        self.server = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "S3Server":
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")


def s3_env(s3: S3Server) -> dict:
    return {"ZFARM_S3_ENDPOINT_URL": s3.endpoint_url, "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def base_env(redis_url: str, storage_url: str, **extra) -> dict:
    env = dict(os.environ)
    env.update({"ZFARM_REDIS_URL": redis_url, "ZFARM_STORAGE_URL": storage_url, "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1", "ZFARM_HEARTBEAT_S": "1", "ZFARM_REGISTRY_TTL_S": "4",
                "ZFARM_UPLOAD_RETRY_S": "30"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({k: str(v) for k, v in extra.items()})
    return env


class WorkerProcess:
    """`python -m worker ...` as a subprocess, its output in a log file."""

    def __init__(self, env: dict, args: list[str], log_path: Path):
        self.env, self.args, self.log_path = env, args, Path(log_path)
        self.proc = None

    def start(self) -> "WorkerProcess":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "worker", *self.args], env=self.env, cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill_group(self) -> None:
        """kill -9 of the worker and its pool processes, as the OOM killer or a dead VM would."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        return self.proc.returncode
