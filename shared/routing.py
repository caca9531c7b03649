"""Routing: which queue a job goes to, which queues a worker serves and in what order, and how long
a job may run. Producers, workers, the sweeper and Flower all ask here.

Queues are `zfarm.{priority}.{tier}.{lane}` Redis lists (Celery queues):
- priority: high, normal, low; served in that order.
- tier: a level of `max_pixels` from the profile table (`tier_ceilings`). "any" holds the jobs every
  GPU class renders; "c<N>" holds larger jobs, which only class N and up can take; "c0" holds jobs
  above every class on record. A worker consumes only tiers it can render every job of.
- lane: concurrent batches of one priority and tier are spread over lanes, which workers take in turn,
  so that one batch does not wait behind another.

No torch, no Redis client: the callers bring their own connections.
"""
from __future__ import annotations

from shared import profiles
from shared.schema import PRIORITIES, SIDE_MAX_PX, STEPS_MAX

QUEUE_PREFIX = "zfarm"
SHARED_TIER = "any"
# Pushed to by nothing: a worker consumes only this until its model is loaded, so Celery has a queue.
HOLDING_QUEUE = "zfarm.hold"
# The largest job the schema accepts.
JOB_MAX_PIXELS = SIDE_MAX_PX * SIDE_MAX_PX

# A job's hard time limit comes from the slowest class's measured speed, scaled to the job's size
# and steps, times a margin, plus a floor for VAE decode, upload and the first call's warm-up.
TIME_LIMIT_FLOOR_S = 120.0
# When nothing is measured yet, assume the common slow recipe (model CPU offload, ~18 s/img).
UNMEASURED_S_PER_IMAGE = 20.0
# Kombu restores a message unacked for longer than the visibility timeout; it must outlast the
# longest job by this much.
VISIBILITY_MARGIN_S = 60.0


# Queue names
def queue(priority: str, tier: str, lane: int) -> str:
    """Celery queue (a Redis list) for jobs of one priority, size tier and lane."""
    return f"{QUEUE_PREFIX}.{priority}.{tier}.{lane}"


def parse_queue(name: str):
    """(priority, tier, lane) of a zfarm job queue name, or None for any other queue."""
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != QUEUE_PREFIX or not parts[3].isdigit():
        return None
    return parts[1], parts[2], int(parts[3])


def is_job_queue(name: str) -> bool:
    """Whether `name` is one of zfarm's job queues (not Celery's own reply or broadcast queues)."""
    return parse_queue(name) is not None


def is_zfarm_queue(name: str) -> bool:
    """Whether `name` is one of zfarm's queues: a job queue or the holding queue. Celery's own queues
    (`<uuid>.reply.celery.pidbox`, broadcast) are not."""
    return is_job_queue(name) or name.startswith(QUEUE_PREFIX + ".")


# Size tiers
def tier_ceilings(max_pixels: dict) -> dict[str, int]:
    """Every size tier the table implies, with the largest job it holds, smallest tier first.

    A tier is a level of `max_pixels`: "any" holds the jobs every GPU class renders (up to the
    smallest class's max_pixels); each larger level is named "c<N>" after the smallest class that
    reaches it; "c0" holds jobs above every class on record (up to the largest job the schema
    allows), which only a worker that renders any size can take. Classes sharing a level share
    its tier, so workers consume no queue that can never fill.

    E.g. {12: 1024², 16: 1024², 24: 2048², 48: 2048²} gives {"any": 1024², "c24": 2048²}."""
    gpu = sorted((px, c) for c, px in max_pixels.items() if c != profiles.CPU_CLASS)
    if not gpu:
        return {SHARED_TIER: JOB_MAX_PIXELS}
    ceilings = {SHARED_TIER: gpu[0][0]}
    top = gpu[0][0]
    for px, vram_class in gpu:  # sorted by pixels, then class: a level's smallest class comes first
        if px > top:
            ceilings[f"c{vram_class}"] = top = px
    if top < JOB_MAX_PIXELS:
        ceilings["c0"] = JOB_MAX_PIXELS
    return ceilings


def tier_for_pixels(pixels: int, max_pixels: dict) -> str:
    """The queue tier of a job: the smallest tier whose ceiling holds it (see `tier_ceilings`)."""
    ceilings = tier_ceilings(max_pixels)
    return next((tier for tier, ceiling in ceilings.items() if pixels <= ceiling), list(ceilings)[-1])


def tiers_served(worker_max_pixels: int, max_pixels: dict) -> list[str]:
    """Tiers a worker can take every job of, largest jobs first, the shared tier last.

    Every worker serves the shared tier, whatever its own max_pixels: "any" is the floor of the
    table, and a worker must consume something."""
    ceilings = tier_ceilings(max_pixels)
    larger = [tier for tier, ceiling in ceilings.items()
              if tier != SHARED_TIER and ceiling <= worker_max_pixels]
    return larger[::-1] + [SHARED_TIER]


# Queue lists and order
def worker_queues(worker_max_pixels: int, table: dict, lanes: int) -> list[str]:
    """Every queue a worker that renders up to `worker_max_pixels` consumes: each priority, each tier
    it can render every job of (`tiers_served`), each lane. `queue_rank` orders them."""
    tiers = tiers_served(worker_max_pixels, profiles.max_pixels_by_class(table))
    return [queue(p, t, lane) for p in PRIORITIES for t in tiers for lane in range(max(1, lanes))]


def all_job_queues(table: dict, lanes: int) -> list[str]:
    """Every job queue a producer can fill: each priority, each size tier of the table, each lane."""
    tiers = tier_ceilings(profiles.max_pixels_by_class(table))
    return [queue(p, t, lane) for p in PRIORITIES for t in tiers for lane in range(max(1, lanes))]


def queue_rank(name: str, ceilings: dict[str, int]) -> tuple[int, int]:
    """Where a queue stands in the order workers serve queues: priority first (high, normal, low),
    then the tier of the largest jobs first (by `tier_ceilings`), the shared tier last. Lanes of
    one priority and tier rank equal: they take turns. Queues that are not zfarm's come last.

    A worker's BRPOP names its queues in this order; the producer pushes a batch's queues in this
    order too, because Redis hands a client blocked on several lists the list pushed first in a
    transaction, not the one it named first."""
    parsed = parse_queue(name)
    if parsed is None or parsed[0] not in PRIORITIES:
        return (len(PRIORITIES), 0)
    priority, tier, _lane = parsed
    size_rank = 0 if tier == SHARED_TIER else -ceilings.get(tier, 1)
    return (PRIORITIES.index(priority), size_rank)


# Lanes
def usable_lanes(own_lanes: int, live_workers: list[dict]) -> int:
    """Lanes a producer may queue into: its own setting, never beyond the fewest any live worker
    consumes (a worker started with a smaller ZFARM_LANES would never see the others)."""
    declared = [int(w["lanes"]) for w in live_workers if str(w.get("lanes", "")).isdigit()]
    return max(1, min([int(own_lanes)] + declared))


def pick_lane(queued_per_lane: list[int], cursor: int) -> int:
    """The lane with the fewest queued messages; ties (typically: all empty) go round by `cursor`,
    a shared counter, so batches submitted at the same moment still spread over different lanes."""
    lanes = len(queued_per_lane)
    return min(range(lanes), key=lambda lane: (queued_per_lane[lane], (lane - cursor) % lanes))


def queue_for(job, lane: int) -> str:
    """The queue a job of a batch in `lane` goes to (its priority and stored tier)."""
    return queue(job.priority, job.tier, lane)


# Time limits
def work_units(pixels: int, steps: int) -> float:
    """A job's work relative to the reference 1024x1024 8-step image (linear in pixels and steps)."""
    return (pixels / profiles.REFERENCE_PIXELS) * (steps / profiles.REFERENCE_STEPS)


def slowest_s_per_image(table: dict) -> float:
    """The slowest class's measured seconds per reference image: the one every limit must allow."""
    speeds = [row["s_per_image"] for row in profiles.class_table(table)
              if row.get("profile") and row.get("s_per_image")]
    return max(speeds) if speeds else UNMEASURED_S_PER_IMAGE


def job_time_limit_s(pixels: int, steps: int, table: dict, margin: float) -> float:
    """A job's hard time limit: the slowest class's time for it, times `margin`, plus a floor."""
    return time_limit_from_speed_s(pixels, steps, slowest_s_per_image(table), margin)


def time_limit_from_speed_s(pixels: int, steps: int, slowest_s: float, margin: float) -> float:
    """`job_time_limit_s` with the slowest class's seconds per reference image (`slowest_s_per_image`)
    already derived: deriving it runs the chooser for every class, so callers that limit many jobs do it once."""
    return round(TIME_LIMIT_FLOOR_S + margin * slowest_s * work_units(pixels, steps), 1)


def time_limit_for(table: dict, margin: float):
    """`job -> hard time limit (s)` for the ledger's requeue calls (the slowest speed derived at the first
    job, once: a sweep that requeues nothing derives nothing)."""
    slowest: list[float] = []

    def limit(job) -> float:
        if not slowest:
            slowest.append(slowest_s_per_image(table))
        return time_limit_from_speed_s(job.spec.pixels, job.spec.steps, slowest[0], margin)
    return limit


def visibility_timeout_s(table: dict, margin: float) -> float:
    """Longer than the longest job any worker may run, so a healthy job is never delivered twice."""
    return job_time_limit_s(JOB_MAX_PIXELS, STEPS_MAX, table, margin) + VISIBILITY_MARGIN_S
