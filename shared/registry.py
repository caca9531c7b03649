"""The worker registry: who is alive, on what card, with which profile, and how fast.

A worker writes its registration at boot and refreshes it with a heartbeat; the entry has a TTL,
so a dead worker drops out by itself. Clean shutdown deletes it. Producers read it to route and to
refuse jobs no live worker can render.
"""
from __future__ import annotations

import json
import time

import redis

from shared import keys, lua

# Moving-average weight of the newest render time in s_per_image.
EMA_WEIGHT = 0.2
_NUMERIC = ("vram_gb", "max_pixels", "host_ram_gb", "started_at", "last_seen", "pid", "simulate_s", "s_per_image_measured",
            "s_per_image_expected")


def register(client: redis.Redis, info: dict, ttl_s: float) -> None:
    name = info["name"]
    record = {k: json.dumps(v) if isinstance(v, (dict, list)) else str(v) for k, v in info.items()}
    record["last_seen"] = str(time.time())
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(keys.worker(name))
        pipe.hset(keys.worker(name), mapping=record)
        pipe.pexpire(keys.worker(name), int(ttl_s * 1000))
        pipe.sadd(keys.WORKERS, name)
        pipe.execute()


def heartbeat(client: redis.Redis, name: str, ttl_s: float, **fields) -> bool:
    """Refresh the entry; False if it had expired (the worker was presumed dead) and must re-register.
    One script, one round trip (it was a MULTI/EXEC of five commands)."""
    values = {"last_seen": str(time.time()), **{k: str(v) for k, v in fields.items()}}
    flat = [item for pair in values.items() for item in pair]
    script = client.register_script(lua.source("heartbeat"))  # EVALSHA; loaded again only if Redis lost it
    return bool(script(keys=[keys.worker(name)], args=[int(ttl_s * 1000), *flat]))


def deregister(client: redis.Redis, name: str) -> None:
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(keys.worker(name))
        pipe.srem(keys.WORKERS, name)
        pipe.execute()


def record_render_time(client: redis.Redis, name: str, render_s: float, pixel_steps_ratio: float = 1.0) -> None:
    """Fold a done job's render time, normalised to a 1024x1024 8-step image, into s_per_image.

    The render task does this inside `Ledger.finish` (its `s_per_image`), in the same step as the
    job's transition and count; this stays for callers that record a speed on its own."""
    if pixel_steps_ratio <= 0:
        return
    stats_key = keys.worker_stats(name)
    previous = client.hget(stats_key, "s_per_image")
    sample = render_s / pixel_steps_ratio
    average = sample if previous is None else (1 - EMA_WEIGHT) * float(previous) + EMA_WEIGHT * sample
    client.hset(stats_key, "s_per_image", f"{average:.4f}")


def _decode(raw: dict) -> dict:
    out = {}
    for k, v in raw.items():
        key, text = k.decode(), v.decode()
        if key == "vram_class":
            out[key] = int(text) if text.isdigit() else text
        elif key in _NUMERIC:
            try:
                out[key] = float(text) if "." in text or "e" in text else int(text)
            except ValueError:
                out[key] = text
        elif text[:1] in ("[", "{"):
            out[key] = json.loads(text)
        else:
            out[key] = text
    return out


def live_workers(client: redis.Redis) -> list[dict]:
    """Registered workers whose heartbeat has not expired, with their job counts and speed."""
    names = sorted(n.decode() for n in client.smembers(keys.WORKERS))
    if not names:
        return []
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(keys.worker(name))
            pipe.hgetall(keys.worker_stats(name))
        replies = pipe.execute()
    workers, dead = [], []
    for name, info, stats in zip(names, replies[::2], replies[1::2]):
        if not info:
            dead.append(name)
            continue
        entry = _decode(info)
        entry["jobs_done"] = int(stats.get(b"jobs_done", 0))
        entry["jobs_failed"] = int(stats.get(b"jobs_failed", 0))
        entry["s_per_image"] = float(stats[b"s_per_image"]) if b"s_per_image" in stats else None
        workers.append(entry)
    if dead:
        client.srem(keys.WORKERS, *dead)
    return workers


def queue_live_max_pixels(pipe) -> None:
    """Queue on `pipe` one EVAL that reads every live worker's max_pixels, so a batch status with
    its waiting-for-worker count stays one round trip. Plain EVAL, not EVALSHA: a pipeline with a
    registered script would first spend a round trip on SCRIPT EXISTS."""
    pipe.eval(lua.source("live_max_pixels"), 1, keys.WORKERS, keys.worker(""))


def parse_live_max_pixels(reply: list) -> dict[str, int]:
    """{worker name: max_pixels} from the reply of `queue_live_max_pixels`."""
    out = {}
    for name, px in zip(reply[::2], reply[1::2]):
        try:
            out[name.decode()] = int(float(px))
        except ValueError:
            continue  # a registration that is not ours to judge: it serves nothing we can route
    return out


def is_alive(client: redis.Redis, name: str) -> bool:
    return bool(client.exists(keys.worker(name)))
