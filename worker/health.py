"""`python -m worker.health`: exit 0 if this worker's registry entry is alive in Redis, else 1.

For container health checks (Dockerfile HEALTHCHECK). The entry has a TTL the heartbeat refreshes,
so "alive" means the worker registered and its heartbeat still runs. The name is the one the worker
wrote to NAME_FILE at boot (its default depends on the card it detected), else ZFARM_WORKER_NAME
completed the way the worker completes it. The one line printed is kept by Docker as the check's
output: it never shows the Redis URL, which holds the password.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import redis

from shared import registry
from shared.redis_conn import connect
from shared.settings import Settings

# Written by worker.startup once the worker knows its name; one file per card under `--gpus`.
NAME_FILE = Path("/tmp/zfarm-worker-name")


def name_file() -> Path:
    """This worker's name file: per card when pinned to one GPU (a `--gpus` child)."""
    card = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return NAME_FILE.with_name(f"{NAME_FILE.name}-gpu{card}") if card.isdigit() else NAME_FILE
# A check must answer within the HEALTHCHECK timeout (15 s in our image), not ride out a Redis
# restart: one retry, so at worst two 5 s connect timeouts.
REDIS_RETRY_S = 2.0


def worker_name(settings: Settings, path: Path = NAME_FILE) -> str:
    try:
        written = path.read_text().strip()
    except FileNotFoundError:
        written = ""
    if written or not settings.worker_name:
        return written
    # worker.startup registers a name without '@' as name@host, like Celery node names.
    name = settings.worker_name
    return name if "@" in name else f"{name}@{socket.gethostname()}"


def check(settings: Settings, path: Path = NAME_FILE) -> tuple[bool, str]:
    name = worker_name(settings, path)
    if not name:
        return False, f"no worker name yet: ZFARM_WORKER_NAME is empty and {path} is missing"
    try:
        alive = registry.is_alive(connect(settings.redis_url, retry_s=REDIS_RETRY_S,
                                          master_name=settings.redis_master_name), name)
    except redis.RedisError as exc:
        return False, f"{name}: Redis unreachable ({type(exc).__name__})"
    return alive, f"{name}: {'registered' if alive else 'not registered (heartbeat stopped or expired)'}"


def main() -> int:
    """Healthy when every worker of this container is: one per card under `zfarm worker --gpus`."""
    settings = Settings.from_env()
    per_card = sorted(NAME_FILE.parent.glob(f"{NAME_FILE.name}-gpu*"))
    results = [check(settings, path) for path in (per_card or [NAME_FILE])]
    print("; ".join(message for _, message in results))
    return 0 if all(healthy for healthy, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
