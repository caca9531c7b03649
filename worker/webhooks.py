"""Batch-completion webhooks: POST the batch's status JSON to the URL it was submitted with.

The ledger pushes a batch id onto `zfarm:events:finished` when its last job ends. Worker parents
pop those events on their heartbeat and deliver each from a thread of its own, a few tries with
backoff, so a slow or dead endpoint never holds up rendering.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request

import redis

from shared import keys
from shared.ledger import Ledger, LedgerError

log = logging.getLogger(__name__)

TRIES = 3
FIRST_DELAY_S = 1.0
EVENTS_PER_TICK = 20


def post_json(url: str, payload: dict, timeout_s: float) -> int:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "zfarm-webhook"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (http/https checked at submit)
        return response.status


def deliver(url: str, payload: dict, timeout_s: float, tries: int = TRIES, first_delay_s: float = FIRST_DELAY_S) -> bool:
    delay_s = first_delay_s
    for attempt in range(1, tries + 1):
        try:
            status = post_json(url, payload, timeout_s)
            if 200 <= status < 300:
                log.info("webhook for batch %s delivered (HTTP %d)", payload.get("batch_id"), status)
                return True
            reason = f"HTTP {status}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        log.warning("webhook for batch %s, try %d/%d failed: %s", payload.get("batch_id"), attempt, tries, reason)
        if attempt < tries:
            time.sleep(delay_s)
            delay_s *= 2
    return False


def deliver_finished(client: redis.Redis, timeout_s: float) -> int:
    """Pop finished-batch events and start a delivery thread for each batch that has a webhook."""
    ledger = Ledger(client)
    started = 0
    for _ in range(EVENTS_PER_TICK):
        raw = client.lpop(keys.FINISHED_EVENTS)
        if raw is None:
            break
        batch_id = raw.decode()
        try:
            status = ledger.status(batch_id)
        except LedgerError as exc:
            log.warning("finished event for %s: %s", batch_id, exc)
            continue
        url = status["meta"].get("webhook")
        if not url:
            continue
        payload = {k: v for k, v in status.items() if k != "meta"}
        threading.Thread(target=deliver, args=(url, payload, timeout_s), name=f"webhook-{batch_id}",
                         daemon=True).start()
        started += 1
    return started
