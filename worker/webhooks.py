"""Batch-completion webhooks: POST the batch's status JSON to the URL it was submitted with.

The ledger pushes a batch id onto `zfarm:events:finished` when its last job ends. Worker parents
pop those events on their heartbeat and deliver each from a thread of its own, a few tries with
backoff, so a slow or dead endpoint never holds up rendering. Before each try the URL is checked again
on fresh DNS answers (`shared.webhook_policy`): a refused address is logged and never called.
"""
from __future__ import annotations

import http.client
import json
import logging
import threading
import time

import redis

from shared import keys, webhook_policy
from shared.ledger import Ledger, LedgerError

log = logging.getLogger(__name__)

TRIES = 3
FIRST_DELAY_S = 1.0
EVENTS_PER_TICK = 20


def post_json(url: str, payload: dict, timeout_s: float, allowed_networks: tuple = ()) -> int:
    """POST `payload` to `url` after checking it again on fresh DNS answers (WebhookRefused when it
    may not be called), connecting to a checked address only; no redirect is followed."""
    target = webhook_policy.check_url(url, allowed_networks)
    body = json.dumps(payload).encode()
    error: OSError | None = None
    for address in target.addresses:
        conn = webhook_policy.connection(target, address, timeout_s)
        try:
            conn.request("POST", target.target, body=body,
                         headers={"Content-Type": "application/json", "User-Agent": "zfarm-webhook"})
            return conn.getresponse().status
        except OSError as exc:  # this address did not answer: the next one may
            error = exc
        finally:
            conn.close()
    raise error


def deliver(url: str, payload: dict, timeout_s: float, tries: int = TRIES, first_delay_s: float = FIRST_DELAY_S,
            allowed_networks: tuple = ()) -> bool:
    delay_s = first_delay_s
    for attempt in range(1, tries + 1):
        try:
            status = post_json(url, payload, timeout_s, allowed_networks)
            if 200 <= status < 300:
                log.info("webhook for batch %s delivered (HTTP %d)", payload.get("batch_id"), status)
                return True
            reason = f"HTTP {status}"
        except webhook_policy.WebhookRefused as exc:
            # Not retried: the address is not one webhooks may reach.
            log.warning("webhook for batch %s refused, not sent: %s", payload.get("batch_id"), exc)
            return False
        except (http.client.HTTPException, OSError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        log.warning("webhook for batch %s, try %d/%d failed: %s", payload.get("batch_id"), attempt, tries, reason)
        if attempt < tries:
            time.sleep(delay_s)
            delay_s *= 2
    return False


def deliver_finished(client: redis.Redis, timeout_s: float, allowed_networks: str = "") -> int:
    """Pop finished-batch events and start a delivery thread for each batch that has a webhook.
    `allowed_networks` is the ZFARM_WEBHOOK_ALLOWED_NETWORKS setting."""
    networks = webhook_policy.parse_allowed_networks(allowed_networks)
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
        threading.Thread(target=deliver, args=(url, payload, timeout_s), kwargs={"allowed_networks": networks},
                         name=f"webhook-{batch_id}", daemon=True).start()
        started += 1
    return started
