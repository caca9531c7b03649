"""The Python API of the producer: `Farm` submits batches, `Batch` follows, collects, cancels them.

    farm = Farm.from_env()
    batch = farm.submit([{"prompt": "a red fox"}, "a lighthouse at dusk"], priority="high")
    final = batch.wait(timeout_s=600)
    batch.collect("out/")

Submitting is all or nothing: every job is validated, sized and checked against the live workers
before `Ledger.create_batch` stores the batch and queues every message in one transaction.
No torch, no Celery: messages are built by `shared.wire`.
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from producer.files import PromptEntry, source_name, validate_records
from shared import keys, profiles, registry, routing, webhook_policy
from shared.errors import SubmitConflict, SubmitError
from shared.ledger import Ledger
from shared.redis_conn import connect
from shared.schema import PRIORITIES, SPEC_FIELDS, Job, JobSpec, check_id, check_name, new_batch_id
from shared.settings import Settings
from shared.storage import open_storage
from shared.wire import render_message

# The soft limit leaves the task this long to clean up (free memory, report) before the hard kill.
SOFT_LIMIT_MARGIN_S = 10.0
# Polling cadence of `Batch.wait`: quick at first, so short batches return promptly, then gentle.
POLL_FIRST_S, POLL_MAX_S, POLL_GROWTH = 0.2, 2.0, 1.5
# How many oversized jobs a refusal lists by name before summarising.
REFUSAL_LISTED = 5
# Downloads overlap: an S3 GET is mostly waiting on the network.
DOWNLOAD_THREADS = 8
# The only storage names collect writes locally; anything else under the prefix is not ours.
_RESULT_NAME = re.compile(r"^(?P<batch>[A-Za-z0-9_-]+)/(?P<index>\d{6})\.(?P<ext>png|json)$")


class Farm:
    """A connection to one zfarm deployment: its Redis, its result storage, its profile table."""

    def __init__(self, settings: Settings, redis_client=None, table: dict | None = None,
                 redis_retry_s: float | None = None, on_redis_retry=None):
        """`redis_retry_s` (default: the producer_redis_retry_s setting) is how long a Redis command is
        retried while Redis is unreachable; `on_redis_retry(error, retry_s)` hears of each such wait."""
        self.settings = settings
        retry_s = settings.producer_redis_retry_s if redis_retry_s is None else redis_retry_s
        self.redis = redis_client if redis_client is not None else connect(
            settings.redis_url, retry_s, on_redis_retry, master_name=settings.redis_master_name)
        self.table = profiles.load_table(settings.profile_table) if table is None else table
        self.ledger = Ledger(self.redis)
        self._storage = None
        self._routing_cache: tuple = (None, None)   # (the table they came from, (max pixels, slowest s/img))

    @classmethod
    def from_env(cls, *, table: dict | None = None, redis_retry_s: float | None = None, on_redis_retry=None,
                 **overrides) -> "Farm":
        """Settings from the ZFARM_* environment, with `overrides` (e.g. redis_url=...) on top."""
        return cls(Settings.from_env(**overrides), table=table, redis_retry_s=redis_retry_s,
                   on_redis_retry=on_redis_retry)

    @property
    def storage(self):
        if self._storage is None:
            self._storage = open_storage(self.settings.storage_url, self.settings.s3_endpoint_url)
        return self._storage

    # Submitting
    def submit(self, jobs_or_specs: Iterable, priority: str = "normal", name: str | None = None,
               idempotency_key: str | None = None, webhook: str | None = None, allow_pending: bool = False,
               defaults: dict | None = None, source: str | None = None) -> "Batch":
        """Validate, size and queue a batch. Items are JobSpecs, dicts (validated over `defaults`),
        prompt strings, or `PromptEntry`s from `producer.files` (so refusals name file lines; their
        defaults were applied when the file was parsed).

        `source` is the prompt file's name, kept (base name only) in the batch metadata.
        Resubmitting with a used idempotency key (or `name`) and the same content returns the earlier
        batch, `created` False; with other content (jobs, priority, webhook; seeds drawn at random aside)
        it raises SubmitConflict naming the differences."""
        if priority not in PRIORITIES:
            raise SubmitError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        if name is not None:
            check_name(name)
        if idempotency_key is not None:
            check_name(idempotency_key, "idempotency_key")
        if webhook:
            _check_webhook(webhook, self.settings.webhook_allowed_networks)
        source_label = _source_label(source)
        entries = _entries(jobs_or_specs, defaults, source_label)
        idem = idempotency_key or (f"name:{name}" if name else "")
        content_sha256 = _content_sha256(entries, priority, webhook)
        resubmission = _Resubmission(f"idempotency key {idempotency_key!r}" if idempotency_key else f"name {name!r}",
                                     content_sha256, entries, priority, webhook, source_label)

        if idem:
            # Answer a resubmission before judging it against today's workers: it was accepted once.
            earlier = self.redis.get(keys.idempotency(idem))
            if earlier:
                return self._resubmitted(earlier.decode(), resubmission)

        max_pixels, slowest_s = self._routing_facts()
        tiers = [routing.tier_for_pixels(e.spec.pixels, max_pixels) for e in entries]
        live = registry.live_workers(self.redis)
        if live and not allow_pending:
            _refuse_oversized(entries, tiers, live, max_pixels, source_label)
        lane = self._pick_lane(priority, sorted(set(tiers)), live)
        batch_id = new_batch_id()
        now = time.time()
        limits: dict[tuple[int, int], float] = {}  # the limit depends on size and steps only
        jobs, queued = [], []
        for index, (entry, tier) in enumerate(zip(entries, tiers)):
            job = Job(batch_id=batch_id, index=index, spec=entry.spec, priority=priority, tier=tier,
                      submitted_at=now)
            limit_key = (entry.spec.pixels, entry.spec.steps)
            if limit_key not in limits:
                limits[limit_key] = routing.time_limit_from_speed_s(*limit_key, slowest_s, self.settings.job_margin)
            hard_s = limits[limit_key]
            queue = routing.queue(priority, tier, lane)
            jobs.append(job)
            queued.append((queue, render_message(job.to_wire(), job.id, queue, hard_s,
                                                 max(1.0, hard_s - SOFT_LIMIT_MARGIN_S))))
        meta = {"name": name or "", "priority": priority, "created_at": now, "total": len(jobs),
                "storage_url": self.settings.storage_url, "webhook": webhook or "",
                "idempotency_key": idem, "source": source_label, "lane": lane,
                "content_sha256": content_sha256,
                "seeds_drawn": _index_ranges([i for i, e in enumerate(entries) if e.seed_drawn]),
                "work_units": round(sum(routing.work_units(j.spec.pixels, j.spec.steps) for j in jobs), 3)}
        # Push in the order workers serve queues (largest tier first): a worker blocked on several
        # queues is handed the first list the transaction pushes to, not the first it named. Within
        # a queue the largest jobs go first (file order among equal ones): a batch whose big jobs
        # came last would end with a few cards busy on them while the rest idle (docs/scheduling.md).
        ceilings = routing.tier_ceilings(max_pixels)
        order = [(routing.queue_rank(queue, ceilings), -routing.work_units(job.spec.pixels, job.spec.steps))
                 for (queue, _), job in zip(queued, jobs)]
        queued = [queued[i] for i in sorted(range(len(queued)), key=order.__getitem__)]
        batch_id, created = self.ledger.create_batch(batch_id, meta, jobs, queued, idem)
        if not created:  # a concurrent submit took the name or key first
            return self._resubmitted(batch_id, resubmission)
        return Batch(self, batch_id, created=created, live_workers=len(live), queues=_count_queues(queued))

    def _resubmitted(self, batch_id: str, again: "_Resubmission") -> "Batch":
        """The earlier batch of a name or key used again, when the content is the same; else
        SubmitConflict naming the differences. Seeds drawn at random on either side are not compared."""
        meta = {k.decode(): v.decode() for k, v in self.redis.hgetall(keys.batch_meta(batch_id)).items()}
        if meta.get("content_sha256") != again.content_sha256:
            differences = _differences(meta, self.ledger.jobs(batch_id), again)
            if differences:
                raise SubmitConflict(
                    f"{again.label} was used for batch {batch_id}, with different content: "
                    + "; ".join(differences) + ". Nothing was queued; submit under another name or key, "
                    f"or follow batch {batch_id}")
        return Batch(self, batch_id, created=False)

    def _routing_facts(self) -> tuple[dict, float]:
        """(each class's largest image, the slowest class's s/img) of `self.table`: what routing and time
        limits read from it. Both run the chooser for every class, so they are derived once per table,
        not once per submit."""
        table, facts = self._routing_cache
        if table is not self.table:
            facts = (profiles.max_pixels_by_class(self.table), routing.slowest_s_per_image(self.table))
            self._routing_cache = (self.table, facts)
        return facts

    def _pick_lane(self, priority: str, tiers: list[str], live: list[dict]) -> int:
        """The lane of this priority with the fewest queued messages over the batch's tiers
        (`routing.pick_lane`), among the lanes every live worker consumes. One round trip."""
        lanes = routing.usable_lanes(self.settings.lanes, live)
        with self.redis.pipeline(transaction=False) as pipe:
            for lane in range(lanes):
                for tier in tiers:
                    pipe.llen(routing.queue(priority, tier, lane))
            pipe.incr(keys.LANE_CURSOR)
            replies = pipe.execute()
        lengths = [sum(replies[lane * len(tiers):(lane + 1) * len(tiers)]) for lane in range(lanes)]
        return routing.pick_lane(lengths, int(replies[-1]))

    # Following
    def batch(self, batch_id: str) -> "Batch":
        return Batch(self, check_id(batch_id))

    def workers(self) -> list[dict]:
        """Live workers, each with name, host, gpu, vram_gb, vram_class, profile, jobs_done,
        jobs_failed, s_per_image, last_seen, max_pixels."""
        return [_worker_row(w) for w in registry.live_workers(self.redis)]


def scale_advice(farm: "Farm", deadline_s: float | None) -> dict:
    """How long the queue takes to drain with the live fleet, and what to add or remove."""
    from shared import capacity

    backlog = [capacity.Backlog(tier, n, work) for tier, (n, work) in farm.ledger.backlog().items()]
    return capacity.advise(backlog, registry.live_workers(farm.redis), farm.table, deadline_s).to_dict()


class Batch:
    def __init__(self, farm: Farm, batch_id: str, created: bool = True, live_workers: int | None = None,
                 queues: dict | None = None):
        self.farm = farm
        self.id = batch_id
        self.created = created          # False when an idempotency key found an earlier batch
        self.live_workers = live_workers  # live workers at submit time (None when not looked up)
        self.queues = queues or {}      # queue -> messages pushed by this submit

    def __repr__(self) -> str:
        return f"Batch({self.id!r})"

    def status(self) -> dict:
        """The ledger's status plus `waiting_for_worker`: queued jobs in tiers no live worker serves,
        counted apart from `queued`. One round trip."""
        with self.farm.redis.pipeline(transaction=False) as pipe:
            Ledger.queue_status(pipe, self.id)
            registry.queue_live_max_pixels(pipe)
            replies = pipe.execute()
        status = Ledger.parse_status(self.id, replies)
        live = registry.parse_live_max_pixels(replies[3])
        return _with_waiting(status, live, self.farm._routing_facts()[0])

    def wait(self, timeout_s: float | None = None, on_progress: Callable[[dict], None] | None = None) -> dict:
        """Poll until every job is final or `timeout_s` passes; returns the last status, whose
        `finished` says which."""
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s)
                                          and timeout_s >= 0):
            raise ValueError(f"timeout_s must be a finite number of seconds >= 0 or None, got {timeout_s!r}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay_s = POLL_FIRST_S
        while True:
            status = self.status()
            if on_progress:
                on_progress(status)
            if status["finished"]:
                return status
            if deadline is not None:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    return status
                delay_s = min(delay_s, remaining_s)
            time.sleep(delay_s)
            delay_s = min(delay_s * POLL_GROWTH, POLL_MAX_S)

    def collect(self, out_dir: str, on_progress=None) -> dict:
        """Download PNGs and sidecars into `out_dir`, write manifest.jsonl and index.html.
        `on_progress(downloaded, total)` follows the downloads."""
        status = self.status()
        summary = collect_batch(self.farm.ledger, self.farm.storage, self.id, Path(out_dir), status, on_progress)
        recorded_url = status["meta"].get("storage_url", "")
        if not summary["downloaded"] and recorded_url and recorded_url != self.farm.settings.storage_url:
            summary["note"] = (f"no results under {self.farm.storage.describe()}; the batch was submitted "
                               f"with storage {recorded_url}")
        return summary

    def cancel(self) -> int:
        """Cancel every job not yet started; returns how many. Running jobs finish."""
        return self.farm.ledger.cancel(self.id)

    def retry_failed(self) -> int:
        """Queue the failed jobs again, in the batch's own lane; returns how many."""
        lane = int(self.status()["meta"].get("lane", 0))
        return self.farm.ledger.requeue_failed(
            self.id, lambda job: routing.queue_for(job, lane),
            routing.time_limit_for(self.farm.table, self.farm.settings.job_margin))


def _source_label(source: str | None) -> str:
    return source_name(source) if source else ""


def _entries(items: Iterable, defaults: dict | None, source_label: str) -> list[PromptEntry]:
    """Every item as a validated PromptEntry; all errors at once (PromptFileError) or none."""
    items = list(items)
    if items and all(isinstance(i, PromptEntry) for i in items):
        return items
    records = []
    for number, item in enumerate(items, 1):
        if isinstance(item, PromptEntry):
            records.append((item.line, item.spec.to_dict()))
        elif isinstance(item, JobSpec):
            records.append((number, item.to_dict()))
        elif isinstance(item, str):
            records.append((number, {"prompt": item}))
        else:
            records.append((number, item))
    return validate_records(records, source_label or "jobs", defaults)


@dataclass(frozen=True)
class _Resubmission:
    label: str            # "name 'x'" or "idempotency key 'k'", for messages
    content_sha256: str
    entries: list
    priority: str
    webhook: str | None
    source_label: str


def _content_sha256(entries: list[PromptEntry], priority: str, webhook: str | None) -> str:
    """What makes two submissions the same batch: every job (a seed drawn at random left out), the
    priority and the webhook."""
    jobs = [{**e.spec.to_dict(), "seed": None if e.seed_drawn else e.spec.seed} for e in entries]
    text = json.dumps({"jobs": jobs, "priority": priority, "webhook": webhook or ""}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _index_ranges(indexes: list[int]) -> str:
    """Sorted indexes as compact ranges: [0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, index in enumerate(indexes):
        if start is None:
            start = index
        if i + 1 == len(indexes) or indexes[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts)


def _parse_index_ranges(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


def _shown(value) -> str:
    return repr(value)[:60] if isinstance(value, str) else str(value)


def _differences(meta: dict, stored_jobs: dict[int, dict], again: _Resubmission) -> list[str]:
    """What differs between a stored batch and a resubmission, one entry per option or job field
    (with how many jobs differ in it and the first of them)."""
    out = []
    if meta.get("priority", "normal") != again.priority:
        out.append(f"priority: {meta.get('priority', 'normal')} there, {again.priority} here")
    if meta.get("webhook", "") != (again.webhook or ""):
        out.append("webhook: a different URL")  # never printed: it may carry a token
    if len(stored_jobs) != len(again.entries):
        out.append(f"jobs: {len(stored_jobs)} there, {len(again.entries)} here")
    # A batch stored before seeds_drawn was recorded: its seeds cannot be told drawn from given.
    drawn_there = _parse_index_ranges(meta["seeds_drawn"]) if "seeds_drawn" in meta else None
    by_field: dict[str, list] = {}
    for index, entry in enumerate(again.entries):
        if index not in stored_jobs:
            break
        there, here = stored_jobs[index].get("spec", {}), entry.spec.to_dict()
        for name in SPEC_FIELDS:
            a, b = there.get(name), here[name]
            if name == "seed":
                if drawn_there is None:
                    continue
                a = "drawn at random" if index in drawn_there else a
                b = "drawn at random" if entry.seed_drawn else b
            if a != b:
                by_field.setdefault(name, []).append((index, entry.line, a, b))
    for name in SPEC_FIELDS:
        if name in by_field:
            index, line, a, b = by_field[name][0]
            where = f"{again.source_label}:{line}" if again.source_label else f"job {index}"
            count = len(by_field[name])
            first = f"{where}: {_shown(a)} there, {_shown(b)} here"
            out.append(f"{name}: {first}" if count == 1 else f"{name} differs in {count} jobs, first {first}")
    return out


def _check_webhook(url: str, allowed_networks: str) -> None:
    """Refuse a webhook the workers may not call (shared.webhook_policy), before anything is queued."""
    try:
        webhook_policy.check_url(url, webhook_policy.parse_allowed_networks(allowed_networks))
    except webhook_policy.WebhookRefused as exc:
        raise SubmitError(f"webhook refused: {exc}; nothing was queued") from None


def _worker_max_pixels(worker: dict) -> int:
    try:
        return int(float(worker.get("max_pixels") or 0))
    except (TypeError, ValueError):
        return 0  # a registration without a usable size renders nothing we can route to it


def _refuse_oversized(entries: list[PromptEntry], tiers: list[str], live: list[dict], max_pixels: dict,
                      source_label: str) -> None:
    """Raise SubmitError if some job is in a size tier no live worker consumes (it is larger than
    every live worker renders). Judged by tiers, as routing and `waiting_for_worker` are, so a job
    accepted is a job some live worker will take."""
    served = {t for w in live for t in routing.tiers_served(_worker_max_pixels(w), max_pixels)}
    oversized = [(i, e) for i, (e, tier) in enumerate(zip(entries, tiers)) if tier not in served]
    if not oversized:
        return
    classes: dict[str, int] = {}
    for worker in live:
        label = profiles.class_label(worker.get("vram_class", "?"))
        classes[label] = max(classes.get(label, 0), _worker_max_pixels(worker))
    served = ", ".join(f"{label} {px} px" for label, px in sorted(classes.items(), key=lambda kv: kv[1]))

    def where(index: int, entry: PromptEntry) -> str:
        return f"{source_label}:{entry.line}" if source_label else f"job {index} (item {entry.line})"

    named = "; ".join(f"{where(i, e)} is {e.spec.width}x{e.spec.height} ({e.spec.pixels} px)"
                      for i, e in oversized[:REFUSAL_LISTED])
    more = f" and {len(oversized) - REFUSAL_LISTED} more" if len(oversized) > REFUSAL_LISTED else ""
    raise SubmitError(f"{len(oversized)} job(s) larger than any live worker renders: {named}{more}; "
                      f"live classes: {served}. Nothing was queued; use --allow-pending to queue them "
                      "for a larger worker that is not running yet")


def _count_queues(queued: list[tuple[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for queue, _ in queued:
        counts[queue] = counts.get(queue, 0) + 1
    return counts


def _with_waiting(status: dict, live_max_pixels: dict[str, int], max_pixels: dict) -> dict:
    served: set[str] = set()
    for px in live_max_pixels.values():
        served.update(routing.tiers_served(px, max_pixels))
    waiting = sum(n for tier, n in status["queued_by_tier"].items() if tier not in served)
    # The ledger never lets queued go below its tier counts; min() guards a hand-edited hash.
    waiting = min(waiting, status["queued"])
    status["waiting_for_worker"] = waiting
    status["queued"] -= waiting
    status["live_workers"] = len(live_max_pixels)
    status["finished"] = status["done"] + status["failed"] + status["cancelled"] >= status["total"]
    return status


def _worker_row(worker: dict) -> dict:
    choice = worker.get("choice") if isinstance(worker.get("choice"), dict) else {}
    row = {
        "name": worker.get("name", ""),
        "host": worker.get("host", ""),
        "gpu": worker.get("gpu", ""),
        "vram_gb": worker.get("vram_gb", worker.get("vram_gib")),
        "vram_class": worker.get("vram_class", choice.get("vram_class")),
        "profile": worker.get("profile", choice.get("profile")),
        "jobs_done": worker.get("jobs_done", 0),
        "jobs_failed": worker.get("jobs_failed", 0),
        "s_per_image": worker.get("s_per_image"),
        "last_seen": worker.get("last_seen"),
        "max_pixels": _worker_max_pixels(worker),
        "state": worker.get("state", ""),  # "loading" until the model is in memory, then "ready"
        "arch": worker.get("arch", ""),
        # Set when the chosen profile failed its boot self-test (or ran out of memory) and another took over.
        "downgraded_from": worker.get("downgraded_from") or None,
        "downgrade_reason": worker.get("downgrade_reason") or None,
        # The quality gate's verdict on the variant it serves (shared.calibration.quality_block), and its policy.
        "policy": worker.get("policy") or None,
        "quality": worker.get("quality") if isinstance(worker.get("quality"), dict) else None,
    }
    return row


def collect_batch(ledger: Ledger, storage, batch_id: str, out_dir: Path, status: dict, on_progress=None) -> dict:
    """Download a batch's results, then write manifest.jsonl and index.html describing every job."""
    out_dir.mkdir(parents=True, exist_ok=True)
    local: dict[str, str] = {}  # storage name -> file name in out_dir
    for name in storage.list(f"{batch_id}/"):
        match = _RESULT_NAME.match(name)
        if match and match["batch"] == batch_id:
            local[name] = f"{match['index']}.{match['ext']}"

    def download(name: str) -> None:
        (out_dir / local[name]).write_bytes(storage.get(name))

    with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
        for done, _ in enumerate(pool.map(download, local), 1):  # iterating re-raises the first error
            if on_progress is not None:
                on_progress(done, len(local))
    got = set(local.values())
    jobs, states = ledger.jobs(batch_id), ledger.states(batch_id)
    failures = {f["index"]: f for f in status["failures"]}
    rows = [_manifest_row(index, jobs[index], states.get(index), failures.get(index), got, out_dir,
                          status["cancelled_batch"]) for index in sorted(jobs)]
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    index_html = out_dir / "index.html"
    index_html.write_text(_contact_sheet(batch_id, status, rows), encoding="utf-8")
    return {"batch_id": batch_id, "out_dir": str(out_dir), "manifest": str(manifest),
            "index_html": str(index_html), "jobs": len(rows),
            "downloaded": sum(1 for r in rows if r["png"]),
            "missing_done": [r["index"] for r in rows if r["status"] == "done" and not r["png"]]}


def failure_reason(failure: dict | None) -> str | None:
    """One line from a stored failure record ({"kind", "message", "worker"} as the worker writes it)."""
    if not failure:
        return None
    message = failure.get("message") or failure.get("reason") or failure.get("error")
    if not message:
        return json.dumps({k: v for k, v in failure.items() if k not in ("index", "worker")})
    return f"{failure['kind']}: {message}" if failure.get("kind") else str(message)


def _manifest_row(index: int, job: dict, state: str | None, failure: dict | None, got: set[str],
                  out_dir: Path, cancelled_batch: bool) -> dict:
    stem = f"{index:06d}"
    sidecar, sidecar_error = {}, None
    if f"{stem}.json" in got:
        try:
            sidecar = json.loads((out_dir / f"{stem}.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            sidecar_error = f"unreadable sidecar: {exc}"
    if not isinstance(sidecar, dict):
        sidecar, sidecar_error = {}, "sidecar is not a JSON object"
    spec = job.get("spec", {})
    row = {
        "index": index,
        "status": state or ("cancelled" if cancelled_batch else "queued"),
        "png": f"{stem}.png" if f"{stem}.png" in got else None,
        "seed": spec.get("seed"),
        "prompt": spec.get("prompt"),
        "width": spec.get("width"),
        "height": spec.get("height"),
        "steps": spec.get("steps"),
        "worker": sidecar.get("worker") or (failure or {}).get("worker"),
        "profile": sidecar.get("profile"),
        "reason": failure_reason(failure),
    }
    if sidecar_error:
        row["sidecar_error"] = sidecar_error
    return row


_SHEET_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
figure img{width:100%;height:auto;display:block;border-radius:4px}
figure.failed{border-color:#d33}
.empty{aspect-ratio:1;display:flex;align-items:center;justify-content:center;background:#eee;color:#777}
figcaption{font-size:12px;margin-top:6px;word-wrap:break-word}
.meta{color:#666}.reason{color:#b00}
"""


def _contact_sheet(batch_id: str, status: dict, rows: list[dict]) -> str:
    e = lambda value: html.escape("" if value is None else str(value), quote=True)  # noqa: E731
    title = f"zfarm batch {batch_id}" + (f" ({status['name']})" if status.get("name") else "")
    counts = ", ".join(f"{status[k]} {k}" for k in ("done", "failed", "cancelled", "running", "queued")
                       if status.get(k))
    cards = []
    for r in rows:
        if r["png"]:
            src = e(r["png"])
            picture = f'<a href="{src}"><img src="{src}" loading="lazy" alt="{e(r["prompt"])}"></a>'
        else:
            picture = f'<div class="empty">{e(r["status"])}</div>'
        details = " &middot; ".join(e(v) for v in (
            f"seed {r['seed']}", r["worker"], r["profile"], f"{r['width']}x{r['height']}") if v)
        reason = f'<div class="reason">{e(r["reason"])}</div>' if r["reason"] else ""
        cards.append(f'<figure class="{e(r["status"])}">{picture}<figcaption><b>#{r["index"]}</b> '
                     f'{e(r["prompt"])}<div class="meta">{details}</div>{reason}</figcaption></figure>')
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{_SHEET_STYLE}</style></head><body>\n<h1>{e(title)}</h1>\n"
            f"<p>{e(status['total'])} jobs: {e(counts)}</p>\n<div class=\"grid\">\n"
            + "\n".join(cards) + "\n</div></body></html>\n")
