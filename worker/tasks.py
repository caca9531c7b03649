"""The render task: validate, claim, render, upload, record. One job per call.

Every job ends in the ledger as done (its PNG and sidecar stored) or failed with a reason. The
Celery task then reports FAILURE for a failed job (never success), and the message is acked
only after that record is written.
"""
from __future__ import annotations

import json
import logging
import time

from celery.exceptions import SoftTimeLimitExceeded
from celery.worker.request import Request

from shared import keys, registry
from shared.ledger import Ledger, LedgerError
from shared.profiles import work_units
from shared.redis_conn import connect
from shared.schema import WIRE_MAX_BYTES, Job, JobError, check_id
from shared.storage import StorageError, open_storage, put_with_retry, result_name
from worker import boot, metrics
from worker.app import app, settings
from worker.render import OutOfMemory

log = logging.getLogger(__name__)

_clients: dict = {}


class JobFailed(Exception):
    """Raised when a job failed; its reason is already stored in the ledger."""


def _redis():
    if "redis" not in _clients:
        _clients["redis"] = connect(settings.redis_url)
    return _clients["redis"]


def _ledger() -> Ledger:
    if "ledger" not in _clients:
        _clients["ledger"] = Ledger(_redis())
    return _clients["ledger"]


def _storage():
    if "storage" not in _clients:
        _clients["storage"] = open_storage(settings.storage_url, settings.s3_endpoint_url)
    return _clients["storage"]


def reject_message(reason: str, detail: dict) -> None:
    """A message that is not a valid job: fail its job if it names one, else record it as rejected."""
    _ledger().reject(reason, {"worker": boot.STATE.name, **detail})
    log.warning("rejected a message: %s", reason)


def _job_ref(raw):
    """(batch_id, index, tier) from an invalid message, when it names a job well enough to fail it."""
    if not isinstance(raw, dict):
        return None
    try:
        batch_id = check_id(raw.get("batch_id"))
        index = raw.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            return None
        tier = raw.get("tier") if isinstance(raw.get("tier"), str) else "any"
        return batch_id, index, check_id(tier, "tier")
    except JobError:
        return None


def _fail_invalid(raw, reason: dict, task_id: str) -> None:
    ref = _job_ref(raw)
    if ref is not None:
        try:
            if _ledger().finish(ref[0], ref[1], "failed", reason, tier=ref[2]):
                return
        except LedgerError:
            pass  # the batch it names does not exist: record the message below instead
    reject_message(reason["message"], {"task_id": task_id, "field": reason.get("field", "")})


def _decode(args, kwargs) -> Job:
    if args or set(kwargs) != {"job"}:
        raise JobError("message", f"expected one keyword argument 'job', got {len(args)} positional and "
                                  f"{sorted(kwargs)[:5]}")
    raw = kwargs["job"]
    try:
        size = len(json.dumps(raw, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise JobError("job", f"not serialisable: {exc}") from None
    if size > WIRE_MAX_BYTES:
        raise JobError("job", f"message is {size} bytes; at most {WIRE_MAX_BYTES}")
    return Job.from_wire(raw)


def sidecar(job: Job, render_facts: dict, render_s: float) -> dict:
    b = boot.STATE.boot
    facts = dict(render_facts)
    return {
        **job.spec.to_dict(), "batch_id": job.batch_id, "index": job.index, "job_id": job.id,
        "priority": job.priority, "worker": boot.STATE.name, "host": b.host, "gpu": b.gpu,
        "vram_class": b.vram_class, "profile": facts.pop("profile", b.choice.profile),
        "model": settings.model, "versions": boot.versions(), "render_s": round(render_s, 3),
        "simulated": bool(facts.pop("simulated", False)), "finished_at": time.time(), **facts,
    }


def run_job(task_id: str, args, kwargs) -> dict:
    try:
        job = _decode(args, kwargs)
    except JobError as exc:
        reason = {"kind": "invalid", "field": exc.field, "message": str(exc)[:1000]}
        _fail_invalid(kwargs.get("job") if isinstance(kwargs, dict) else None, reason, task_id)
        raise JobFailed(f"invalid job: {exc}"[:1000]) from None

    ledger = _ledger()
    state = ledger.start(job, boot.STATE.claim)
    if state == "unknown":
        reject_message(f"job {job.id} is not a job of any batch on record", {"task_id": task_id})
        raise JobFailed(f"job {job.id}: not on record")
    if state == "exhausted":
        reason = {"kind": "worker-lost", "message": "the worker rendering this job died on every attempt"}
        ledger.finish(job.batch_id, job.index, "failed", reason, tier=job.tier)
        raise JobFailed(f"job {job.id}: {reason['message']}")
    if state != "run":
        log.info("job %s skipped: %s", job.id, state)
        return {"job_id": job.id, "skipped": state}

    b = boot.STATE.boot
    try:
        try:
            result = boot.renderer().render(job.spec)
        except SoftTimeLimitExceeded:
            raise _Failure("time-limit", "the job exceeded its time limit") from None
        except OutOfMemory as exc:
            raise _Failure("out-of-memory", str(exc)) from None
        except Exception as exc:  # a render error fails this job with its reason, never the worker
            log.exception("job %s failed while rendering", job.id)
            raise _Failure("render-error", f"{type(exc).__name__}: {exc}") from None
        record = sidecar(job, result.facts, result.render_s)
        try:
            put_with_retry(_storage(), result_name(job.batch_id, job.index, "png"), result.png, "image/png",
                           settings.upload_retry_s, on_retry=lambda _exc: metrics.count_upload_retry())
            put_with_retry(_storage(), result_name(job.batch_id, job.index, "json"),
                           json.dumps(record, indent=1, default=str).encode(), "application/json",
                           settings.upload_retry_s, on_retry=lambda _exc: metrics.count_upload_retry())
        except StorageError as exc:
            raise _Failure("upload", str(exc)) from None
    except _Failure as failure:
        reason = {"kind": failure.kind, "message": failure.message[:2000], "worker": boot.STATE.name}
        ledger.finish(job.batch_id, job.index, "failed", reason, tier=job.tier)
        registry.record_job(_redis(), boot.STATE.name, "failed", None)
        metrics.count_failed(b.vram_class, b.choice.profile, failure.kind)
        raise JobFailed(f"job {job.id}: {failure.kind}: {failure.message}"[:2000]) from None
    ledger.finish(job.batch_id, job.index, "done", tier=job.tier)
    _note_render_facts(b, record)
    registry.record_job(_redis(), boot.STATE.name, "done", result.render_s,
                        work_units(job.spec.pixels, job.spec.steps))
    metrics.observe_render(b.vram_class, record["profile"], result.render_s)
    return {"job_id": job.id, "render_s": round(result.render_s, 3)}


def _note_render_facts(b, record: dict) -> None:
    """An out-of-memory step-down changes this worker's profile: say so in the registry and metrics."""
    if record.get("peak_vram_gib") is not None:
        metrics.set_peak_vram(b.vram_class, float(record["peak_vram_gib"]))
    downgraded_from = record.get("downgraded_from")
    if downgraded_from:
        metrics.count_oom_stepdown(b.vram_class, downgraded_from, record["profile"])
        _redis().hset(keys.worker(boot.STATE.name), mapping={
            "profile": record["profile"], "downgraded_from": downgraded_from})


class _Failure(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


class RenderRequest(Request):
    """Runs in the parent: a job killed by its hard time limit is failed with that reason."""

    def on_timeout(self, soft, timeout):
        super().on_timeout(soft, timeout)
        if soft:
            return
        job = (self.kwargs or {}).get("job") if isinstance(self.kwargs, dict) else None
        ref = _job_ref(job)
        if ref is not None:
            reason = {"kind": "time-limit", "message": f"hard time limit of {timeout:g} s exceeded",
                      "worker": boot.STATE.name}
            try:
                _ledger().finish(ref[0], ref[1], "failed", reason, tier=ref[2])
            except LedgerError as exc:
                log.warning("time limit of %s not recorded: %s", self.id, exc)


@app.task(name="zfarm.render", bind=True, acks_late=True, reject_on_worker_lost=True,
          throws=(JobFailed,), Request=RenderRequest)
def render(self, *args, **kwargs):
    return run_job(self.request.id, args, kwargs)

