"""Scaling advice: when will the queue drain with the fleet as it is, and what to add or remove to
meet a deadline. Pure arithmetic over the ledger's queue depths and the registry's speeds.

Work is counted in reference images (1024x1024, 8 steps; `routing.work_units`), speeds in
seconds per reference image: each worker's moving average when it has one, else its measured
profile's figure, else the class's figure from the profile table.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from shared import profiles, routing


@dataclass(frozen=True)
class Backlog:
    tier: str            # "any", "c24", ... (see routing.tier_for_pixels)
    jobs: int
    work_units: float


@dataclass
class Advice:
    remaining_jobs: int
    remaining_work_units: float
    fleet_images_per_hour: float
    expected_finish_s: float | None          # None: some work has no worker that can do it
    deadline_s: float | None
    meets_deadline: bool | None
    add: dict = field(default_factory=dict)  # class -> workers to add (each option on its own)
    remove: dict = field(default_factory=dict)  # class -> workers that could go and still meet it
    stranded_tiers: list = field(default_factory=list)  # tiers no live worker serves

    def to_dict(self) -> dict:
        return asdict(self)


def worker_speed_s(worker: dict, table: dict) -> float | None:
    for key in ("s_per_image", "s_per_image_measured"):
        value = worker.get(key)
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    vram_class = worker.get("vram_class")
    try:
        return profiles.choose(table, vram_class).s_per_image
    except (profiles.ProfileError, KeyError, TypeError):
        return None


def _tier_min_pixels(tier: str, max_pixels: dict) -> int:
    """Smallest max_pixels a worker needs to take every job of this tier: the tier's ceiling
    (`routing.tier_ceilings`); every worker serves the shared tier."""
    if tier == "any":
        return 0
    return routing.tier_ceilings(max_pixels).get(tier, routing.JOB_MAX_PIXELS)


def finish_s(backlog: list[Backlog], workers: list[tuple[int, float]], max_pixels: dict) -> float | None:
    """Drain time, lower-bounded per tier: work that only capable workers can do, at their rate.

    `workers` holds (max_pixels, s_per_image) pairs."""
    worst = 0.0
    tiers = sorted({b.tier for b in backlog if b.work_units > 0}, key=lambda t: _tier_min_pixels(t, max_pixels))
    for tier in tiers:
        need_px = _tier_min_pixels(tier, max_pixels)
        work = sum(b.work_units for b in backlog if _tier_min_pixels(b.tier, max_pixels) >= need_px)
        rate = sum(1.0 / s for px, s in workers if px >= need_px and s)
        if work and not rate:
            return None
        if work:
            worst = max(worst, work / rate)
    return worst


def advise(backlog: list[Backlog], live_workers: list[dict], table: dict, deadline_s: float | None) -> Advice:
    max_pixels = profiles.max_pixels_by_class(table)
    fleet = []
    for w in live_workers:
        speed = worker_speed_s(w, table)
        if speed:
            fleet.append((int(w.get("max_pixels") or 0), speed, w.get("vram_class")))
    pairs = [(px, s) for px, s, _ in fleet]
    work = sum(b.work_units for b in backlog)
    advice = Advice(
        remaining_jobs=sum(b.jobs for b in backlog), remaining_work_units=round(work, 2),
        fleet_images_per_hour=round(sum(3600.0 / s for _, s in pairs), 1),
        expected_finish_s=finish_s(backlog, pairs, max_pixels), deadline_s=deadline_s, meets_deadline=None)
    advice.stranded_tiers = sorted({b.tier for b in backlog if b.work_units and not any(
        px >= _tier_min_pixels(b.tier, max_pixels) for px, _ in pairs)})
    if deadline_s is None:
        return advice
    now = advice.expected_finish_s
    advice.meets_deadline = now is not None and now <= deadline_s
    if not advice.meets_deadline:
        for row in profiles.class_table(table):
            if not row.get("profile") or not row.get("s_per_image") or row["vram_class"] == profiles.CPU_CLASS:
                continue
            added = 0
            candidate = list(pairs)
            while added < 1000:
                t = finish_s(backlog, candidate, max_pixels)
                if t is not None and t <= deadline_s:
                    break
                candidate.append((row["max_pixels"], row["s_per_image"]))
                added += 1
            if added < 1000:
                advice.add[str(row["vram_class"])] = added
    else:
        # Drop the slowest workers first while the deadline still holds.
        remaining = sorted(fleet, key=lambda f: -f[1])
        removed: dict = {}
        for member in list(remaining):
            trial = [m for m in remaining if m is not member]
            t = finish_s(backlog, [(px, s) for px, s, _ in trial], max_pixels)
            if trial and t is not None and t <= deadline_s:
                remaining = trial
                removed[str(member[2])] = removed.get(str(member[2]), 0) + 1
        advice.remove = removed
    return advice


def parse_duration_s(text: str) -> float:
    """'90s', '45m', '2h', '1h30m' or plain seconds."""
    text = text.strip().lower()
    if not text:
        raise ValueError("empty duration")
    try:
        return float(text)
    except ValueError:
        pass
    total, number = 0.0, ""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    for ch in text:
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in units and number:
            total += float(number) * units[ch]
            number = ""
        else:
            raise ValueError(f"cannot read duration {text!r} (e.g. 90s, 45m, 2h, 1h30m)")
    if number:
        raise ValueError(f"cannot read duration {text!r}: a number without a unit at the end")
    if not math.isfinite(total) or total <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return total
