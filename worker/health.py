"""`python -m worker.health`: exit 0 if this worker's registry entry is alive in Redis, else 1.

For container health checks (Dockerfile HEALTHCHECK). The entry has a TTL the heartbeat refreshes,
so "alive" means the worker registered and its heartbeat still runs. The name is ZFARM_WORKER_NAME,
or else the file the worker writes at boot (its default name depends on the card it detected).
The one line printed is kept by Docker as the check's output: it never shows the Redis URL, which
holds the password.
"""
from __future__ import annotations

import sys
from pathlib import Path

import redis

from shared import registry
from shared.redis_conn import connect
from shared.settings import Settings

NAME_FILE = Path("/tmp/zfarm-worker-name")
# A check must answer within the HEALTHCHECK timeout (15 s in our image), not ride out a Redis
# restart: one retry, so at worst two 5 s connect timeouts.
REDIS_RETRY_S = 2.0


def write_name(name: str, path: Path = NAME_FILE) -> None:
    """Called by the worker at boot, once its name is known."""
    path.write_text(name + "\n")


def worker_name(settings: Settings, path: Path = NAME_FILE) -> str:
    if settings.worker_name:
        return settings.worker_name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def check(settings: Settings, path: Path = NAME_FILE) -> tuple[bool, str]:
    name = worker_name(settings, path)
    if not name:
        return False, f"no worker name yet: ZFARM_WORKER_NAME is empty and {path} is missing"
    try:
        alive = registry.is_alive(connect(settings.redis_url, retry_s=REDIS_RETRY_S), name)
    except redis.RedisError as exc:
        return False, f"{name}: Redis unreachable ({type(exc).__name__})"
    return alive, f"{name}: {'registered' if alive else 'not registered (heartbeat stopped or expired)'}"


def main() -> int:
    healthy, message = check(Settings.from_env())
    print(message)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
