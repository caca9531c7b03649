"""kombu's Redis transport, hardened against junk in the queues.

Stock kombu parses each BRPOPed item as a JSON envelope inside its event loop; an item that is
not JSON, or JSON without the envelope's fields, raises there and takes the whole worker down
("Unrecoverable error"). Anyone who can write to Redis could stop the farm that way. Here such an
item is recorded in the ledger's rejected list with its reason and dropped, and the worker goes on.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import time

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from shared import keys

log = logging.getLogger(__name__)


def envelope_problem(payload) -> str | None:
    """Why `payload` is not a kombu envelope kombu can build a Message from, or None if it is."""
    if not isinstance(payload, dict):
        return f"envelope is a JSON {type(payload).__name__}, not an object"
    properties = payload.get("properties")
    if not isinstance(properties, dict) or "delivery_tag" not in properties:
        return "envelope has no properties.delivery_tag"
    if not isinstance(properties.get("delivery_info", {}), dict):
        return "envelope's properties.delivery_info is not an object"
    body = payload.get("body")
    if body and properties.get("body_encoding") == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError, TypeError):
            return "envelope body is not valid base64"
    return None


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options):
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            try:
                payload = loads(bytes_to_str(item))
                problem = envelope_problem(payload)
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                problem = f"queue item is not JSON: {exc}"
            if problem:
                self._reject_item(dest, item, problem)
                return True
            self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _reject_item(self, queue: str, item, problem: str) -> None:
        record = json.dumps({"at": time.time(), "reason": problem, "queue": queue,
                             "body_prefix": repr(item[:200])})
        log.warning("dropped a queue item from %s: %s", queue, problem)
        with self.conn_or_acquire() as client:
            client.lpush(keys.REJECTED, record)
            client.ltrim(keys.REJECTED, 0, keys.REJECTED_MAX - 1)


class Transport(kombu_redis.Transport):
    Channel = Channel
