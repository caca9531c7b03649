"""Every Redis key and queue name zfarm uses, built in one place.

Ids reaching these functions have passed `schema.check_id`, so no key can be forged through a
batch name or a worker name.
"""
from __future__ import annotations

PREFIX = "zfarm"

# Per batch
def batch_meta(batch_id: str) -> str:
    """hash: name, priority, total, created_at, finished_at, webhook, storage_url, ..."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_counts(batch_id: str) -> str:
    """hash: queued, running, done, failed, cancelled, and queued:<tier> per size tier."""
    return f"{PREFIX}:batch:{batch_id}:counts"


def batch_jobs(batch_id: str) -> str:
    """hash: index -> job wire JSON, kept so failed jobs can be retried and results listed."""
    return f"{PREFIX}:batch:{batch_id}:jobs"


def batch_states(batch_id: str) -> str:
    """hash: index -> running|done|failed|cancelled (absent means queued)."""
    return f"{PREFIX}:batch:{batch_id}:states"


def batch_failures(batch_id: str) -> str:
    """hash: index -> reason JSON of each failed job."""
    return f"{PREFIX}:batch:{batch_id}:failures"


def batch_running(batch_id: str) -> str:
    """hash: index -> worker name currently rendering it."""
    return f"{PREFIX}:batch:{batch_id}:running"


def batch_attempts(batch_id: str) -> str:
    """hash: index -> how many times a worker started it (a job that kills workers stops somewhere)."""
    return f"{PREFIX}:batch:{batch_id}:attempts"


BATCHES = f"{PREFIX}:batches"  # zset: batch_id -> created_at
ACTIVE_BATCHES = f"{PREFIX}:batches:active"  # set of batch ids not yet finished
FINISHED_EVENTS = f"{PREFIX}:events:finished"  # list of finished batch ids (webhooks)
REJECTED = f"{PREFIX}:rejected"  # list of JSON records: messages that named no valid job
REJECTED_MAX = 10_000
LANE_CURSOR = f"{PREFIX}:lane-cursor"  # counter: breaks ties between empty lanes for concurrent submits


def idempotency(key: str) -> str:
    return f"{PREFIX}:idem:{key}"


# Worker registry
WORKERS = f"{PREFIX}:workers"  # set of worker names that registered


def worker(name: str) -> str:
    """hash with a TTL refreshed by the heartbeat: the worker's registration."""
    return f"{PREFIX}:worker:{name}"


def worker_stats(name: str) -> str:
    """hash without TTL: jobs_done, jobs_failed, s_per_image moving average."""
    return f"{PREFIX}:worker:{name}:stats"


SWEEP_LOCK = f"{PREFIX}:lock:sweep"
LOST_SCAN_LOCK = f"{PREFIX}:lock:lost-scan"
# hash: "batch_id/index" -> when a scan first found that unfinished job with no message anywhere.
LOST_SUSPECTS = f"{PREFIX}:lost-suspects"

# Celery/kombu's own keys (kombu.transport.redis defaults), read by the dead-worker sweep.
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"


# Quality gate (worker.calibration, shared.calibration)
def calibration_result(revision: str, probe_set: str, profile: str, policy: str, arch: str, torch: str) -> str:
    """string: JSON of one calibration (the probes' PSNR and SSIM) of a model revision with one profile and
    quantisation policy on one architecture and torch; kept without expiry, as in storage."""
    return f"{PREFIX}:calibration:{revision}:{probe_set}:{profile}:{policy}:{arch}:{torch}"


def calibration_references_lock(revision: str, probe_set: str) -> str:
    """string with a TTL: the worker rendering this revision's references holds it; others wait for them."""
    return f"{PREFIX}:calibration:{revision}:{probe_set}:references-lock"
