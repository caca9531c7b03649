"""Celery's consumer, with messages that are not zfarm jobs failed visibly instead of dropped.

Celery logs and drops a message it cannot decode, names an unknown task, or cannot parse as a task.
Anyone who can write to Redis can push such a message; here each one is recorded in the ledger's
rejected list with its reason (and, when the message names a job of a known batch, that job is
failed), then acknowledged, so it can neither stall the worker nor vanish without a trace.
"""
from __future__ import annotations

import logging

from celery.worker.consumer import Consumer

log = logging.getLogger(__name__)


def _describe(message) -> dict:
    headers = getattr(message, "headers", None) or {}
    delivery = getattr(message, "delivery_info", None) or {}
    body = getattr(message, "body", b"")
    return {"task_id": str(headers.get("id", ""))[:100], "task": str(headers.get("task", ""))[:100],
            "queue": str(delivery.get("routing_key", ""))[:100], "body_prefix": repr(body[:200])}


class ZfarmConsumer(Consumer):
    def _reject(self, reason: str, message) -> None:
        from worker.tasks import reject_message

        reject_message(reason, _describe(message))

    def on_decode_error(self, message, exc):
        self._reject(f"message body cannot be decoded: {type(exc).__name__}: {exc}"[:500], message)
        message.ack()

    def on_unknown_message(self, body, message):
        self._reject("message is not a Celery task message", message)
        message.ack()

    def on_unknown_task(self, body, message, exc):
        self._reject(f"message names an unknown task: {exc}"[:500], message)
        message.ack()

    def on_invalid_task(self, body, message, exc):
        self._reject(f"invalid task message: {type(exc).__name__}: {exc}"[:500], message)
        message.ack()
