"""The render task: validate, claim, render, upload, record. One job per call.

Every job ends in the ledger as done (its PNG and sidecar stored) or failed with a reason. The
Celery task then reports FAILURE for a failed job (never success), and the message is acked
only after that record is written. An error that is not the job's fault (Redis gone for longer
than the client retries, a bug) hands the message back to the queue instead of acking it; the
ledger's attempt count (`ledger.MAX_ATTEMPTS`) stops a job that fails that way every time.
"""
from __future__ import annotations

import json
import logging
import time

from billiard.exceptions import WorkerLostError
from celery.exceptions import Reject, SoftTimeLimitExceeded, Terminated, TimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.request import Request

from shared import keys
from shared.errors import JobError, JobFailed, OutOfMemory, RenderFailure, StorageError
from shared.ledger import FINAL_STATES, MAX_ATTEMPTS, Ledger
from shared.redis_conn import connect
from shared.routing import work_units
from shared.schema import WIRE_MAX_BYTES, Job
from shared.storage import open_storage, put_with_retry, result_name
from worker import config, loading, metrics
from worker.app import app
from worker.state import STATE, versions

log = logging.getLogger(__name__)

# Between a message's pop and this task's start: milliseconds; this much is allowed for it.
CLAIM_MARGIN_S = 1.0

_clients: dict = {}




def _redis():
    if "redis" not in _clients:
        _clients["redis"] = connect(config.settings().redis_url, master_name=config.settings().redis_master_name)
    return _clients["redis"]


def _ledger() -> Ledger:
    if "ledger" not in _clients:
        _clients["ledger"] = Ledger(_redis())
    return _clients["ledger"]


def _storage():
    if "storage" not in _clients:
        settings = config.settings()
        _clients["storage"] = open_storage(settings.storage_url, settings.s3_endpoint_url)
    return _clients["storage"]


def reject_message(reason: str, detail: dict) -> None:
    """A message that is not a valid job: fail its job if it names one, else record it as rejected."""
    _ledger().reject(reason, {"worker": STATE.name, **detail})
    log.warning("rejected a message: %s", reason)


def _named_job(kwargs):
    """The `job` a task's keyword arguments carry, valid or not."""
    return kwargs.get("job") if isinstance(kwargs, dict) else None


def _fail_invalid(raw, reason: dict, task_id: str) -> None:
    """Fail the job an invalid message names when the message is that job's own (same task id), or
    record the message as rejected when it names none, is another's, or names one already final (a
    message is never counted twice)."""
    if not _ledger().fail_invalid_message(raw, reason, task_id):
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
    b = STATE.boot
    facts = dict(render_facts)
    # The renderer knows the resolved folder; the sidecar names the model as the user gave it.
    facts.pop("model", None)
    # The worker's versions (celery, kombu, redis...) and the renderer's (torch, diffusers, cuda...) together.
    rendered_with = {**versions(), **facts.pop("versions", {})}
    return {
        **job.spec.to_dict(), "batch_id": job.batch_id, "index": job.index, "job_id": job.id,
        "priority": job.priority, "worker": STATE.name, "host": b.host, "gpu": b.gpu,
        "vram_class": b.vram_class, "profile": facts.pop("profile", b.choice.profile),
        "model": config.settings().model, "model_path": STATE.model_path, "versions": rendered_with,
        "render_s": round(render_s, 3),
        "simulated": bool(facts.pop("simulated", False)), "finished_at": time.time(), **facts,
    }


def run_job(task_id: str, args, kwargs) -> dict:
    """Render one job. Raises JobFailed (reason stored) or Reject (message handed back)."""
    try:
        return _run_job(task_id, args, kwargs)
    except JobFailed:
        raise
    except SoftTimeLimitExceeded:
        # Outside the render itself (an upload retrying, say): the job is failed all the same.
        reason = {"kind": "time-limit", "message": "the job exceeded its soft time limit",
                  "worker": STATE.name}
        if not _ledger().fail_invalid(_named_job(kwargs), reason):
            log.warning("soft time limit of %s not recorded: its job is unknown or already final", task_id)
        raise JobFailed(f"job message {task_id}: time-limit: {reason['message']}") from None
    except Exception as exc:  # not the job's fault, or not known to be: hand it back, never drop it
        log.exception("job message %s hit an internal error; handing it back to the queue", task_id)
        raise Reject(f"{type(exc).__name__}: {exc}"[:500], requeue=True) from None


def _run_job(task_id: str, args, kwargs) -> dict:
    try:
        job = _decode(args, kwargs)
    except JobError as exc:
        reason = {"kind": "invalid", "field": exc.field, "message": str(exc)[:1000]}
        _fail_invalid(_named_job(kwargs), reason, task_id)
        raise JobFailed(f"invalid job: {exc}"[:1000]) from None

    ledger = _ledger()
    started = time.monotonic()
    state = ledger.start(job, STATE.claim)
    if state == "unknown":
        reject_message(f"job {job.id} is not a job of any batch on record", {"task_id": task_id})
        raise JobFailed(f"job {job.id}: not on record")
    if state == "exhausted":
        reason = {"kind": "worker-lost", "worker": STATE.name,
                  "message": f"started {MAX_ATTEMPTS} times and never finished: the worker rendering it "
                             "died (or hit an internal error) on every attempt"}
        ledger.finish(job.batch_id, job.index, "failed", reason, tier=job.tier)
        raise JobFailed(f"job {job.id}: {reason['message']}")
    if state not in ("run", "rerun"):
        log.info("job %s skipped: %s", job.id, state)
        return {"job_id": job.id, "skipped": state}

    b = STATE.boot
    upload_retry_s = config.settings().upload_retry_s
    try:
        try:
            result = loading.renderer().render(job.spec)
        except SoftTimeLimitExceeded:
            raise RenderFailure("time-limit", "the job exceeded its time limit") from None
        except OutOfMemory as exc:
            raise RenderFailure("out-of-memory", str(exc)) from None
        except Exception as exc:  # a render error fails this job with its reason, never the worker
            log.exception("job %s failed while rendering", job.id)
            raise RenderFailure("render-error", f"{type(exc).__name__}: {exc}") from None
        # Only another delivery of this job can have finished it meanwhile, and there is none unless the
        # job was claimed before ('rerun') or this delivery is older than the sweep's minimum age (one
        # registry TTL: no message younger is handed back). Otherwise no second look: a command a job.
        if (state == "rerun" or time.monotonic() - started >= config.settings().registry_ttl_s - CLAIM_MARGIN_S) \
                and ledger.state(job.batch_id, job.index) in FINAL_STATES:
            # A second delivery of this job (a restored message) finished it meanwhile: its stored
            # result stays as it is, rather than being overwritten by this render.
            log.warning("job %s was finished by another delivery while this one rendered; not stored again",
                        job.id)
            return {"job_id": job.id, "skipped": "finished-elsewhere"}
        record = sidecar(job, result.facts, result.render_s)
        try:
            put_with_retry(_storage(), result_name(job.batch_id, job.index, "png"), result.png, "image/png",
                           upload_retry_s, on_retry=lambda _exc: metrics.count_upload_retry())
            put_with_retry(_storage(), result_name(job.batch_id, job.index, "json"),
                           json.dumps(record, indent=1, default=str).encode(), "application/json",
                           upload_retry_s, on_retry=lambda _exc: metrics.count_upload_retry())
        except StorageError as exc:
            raise RenderFailure("upload", str(exc)) from None
    except RenderFailure as failure:
        reason = {"kind": failure.kind, "message": failure.message[:2000], "worker": STATE.name}
        if ledger.finish(job.batch_id, job.index, "failed", reason, tier=job.tier, worker=STATE.name):
            metrics.count_failed(b.vram_class, b.choice.profile, failure.kind)
        raise JobFailed(f"job {job.id}: {failure.kind}: {failure.message}"[:2000]) from None
    units = work_units(job.spec.pixels, job.spec.steps)
    if not ledger.finish(job.batch_id, job.index, "done", tier=job.tier, worker=STATE.name,
                         s_per_image=result.render_s / units if units > 0 else None):
        # Another delivery of this job finished it first; the job counts once, and so does its render.
        log.warning("job %s was already final; this render (stored at the same key) is not counted again", job.id)
        return {"job_id": job.id, "skipped": "finished-elsewhere"}
    _note_render_facts(b, record)
    metrics.observe_render(b.vram_class, record["profile"], result.render_s)
    return {"job_id": job.id, "render_s": round(result.render_s, 3)}


def _note_render_facts(b, record: dict) -> None:
    """An out-of-memory step-down changes this worker's profile: say so in the registry and metrics."""
    if record.get("peak_vram_gib") is not None:
        metrics.set_peak_vram(b.vram_class, float(record["peak_vram_gib"]))
    stepped = record.get("oom_step_down")
    if stepped:
        metrics.count_oom_stepdown(b.vram_class, stepped["from"], stepped["to"])
        STATE.step_down = {"downgraded_from": stepped["from"], "downgrade_reason": record["downgrade_reason"]}
        # The profile stepped down to passed the quality gate too (worker.engine.diffusion): its block replaces.
        STATE.policy, STATE.quality = record.get("policy", ""), record.get("quality", {})
        _redis().hset(keys.worker(STATE.name), mapping={"profile": stepped["to"], "policy": STATE.policy,
                                                        "quality": json.dumps(STATE.quality), **STATE.step_down})


class RenderRequest(Request):
    """Runs in the parent: a job killed by its hard time limit is failed with that reason, and a
    message that failed outside `run_job` is failed or rejected visibly, not dropped."""

    def on_timeout(self, soft, timeout):
        # During a cold shutdown Celery cancels jobs to hand them back: that is no time limit.
        if not soft and not worker_state.should_terminate:
            # Recorded before Celery acks the message: once acked, the record is all that is left.
            reason = {"kind": "time-limit", "message": f"hard time limit of {timeout:g} s exceeded",
                      "worker": STATE.name}
            if not _ledger().fail_invalid(_named_job(self.kwargs), reason):
                log.warning("time limit of %s not recorded: its job is unknown or already final", self.id)
        super().on_timeout(soft, timeout)

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # billiard wraps exceptions from the pool
        # JobFailed: recorded by run_job. Reject: handed back. The others are Celery's own paths
        # (worker lost: requeued; time limit: on_timeout; terminated: cold shutdown hands it back).
        if not isinstance(exc, (JobFailed, Reject, WorkerLostError, TimeLimitExceeded, Terminated,
                                SystemExit, KeyboardInterrupt, MemoryError)):
            reason = {"kind": "invalid", "field": "message",
                      "message": f"the task failed before it ran: {type(exc).__name__}: {exc}"[:1000]}
            _fail_invalid(_named_job(self.kwargs), reason, self.id)
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


@app.task(name="zfarm.render", bind=True, acks_late=True, reject_on_worker_lost=True,
          throws=(JobFailed,), Request=RenderRequest)
def render(self, *args, **kwargs):
    return run_job(self.request.id, args, kwargs)

