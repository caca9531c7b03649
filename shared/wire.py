"""The Celery message envelope, built without Celery so that queuing 10,000 jobs is one pipelined
LPUSH and the producer never imports the worker.

This is Celery's task protocol 2 inside kombu's Redis envelope, JSON only: the same bytes
`app.send_task("zfarm.render", kwargs={"job": ...}, queue=...)` would put in the list.
"""
from __future__ import annotations

import base64
import json
import uuid

RENDER_TASK = "zfarm.render"


def _dumps(obj) -> str:
    # allow_nan=False: NaN is not JSON, and a worker must never be handed one by us.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def task_message(task_name: str, task_id: str, kwargs: dict, queue: str,
                 time_limit_s: float | None = None, soft_time_limit_s: float | None = None,
                 origin: str = "zfarm-producer") -> str:
    body = _dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    headers = {
        "lang": "py", "task": task_name, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0,
        "timelimit": [time_limit_s, soft_time_limit_s], "root_id": task_id, "parent_id": None,
        "argsrepr": "()", "kwargsrepr": f"{{job: {task_id}}}", "origin": origin,
        "ignore_result": True, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }
    envelope = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }
    return _dumps(envelope)


def render_message(job_wire: dict, task_id: str, queue: str, time_limit_s: float,
                   soft_time_limit_s: float | None = None) -> str:
    return task_message(RENDER_TASK, task_id, {"job": job_wire}, queue, time_limit_s, soft_time_limit_s)


def envelope_task_id(raw: str | bytes) -> str | None:
    """The task id of a kombu envelope, or None if it is not one."""
    try:
        return json.loads(raw)["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return None
