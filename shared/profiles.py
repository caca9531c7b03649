"""VRAM classes, the measured profile table, and the chooser that reads it.

No torch here: the producer uses the table for routing (`max_pixels` per class) and
`zfarm profiles` prints it. How a profile is applied to a pipeline lives in `worker.offload`.

The table is `bench/results/profile_table.json` (shipped in the package as
`shared/profile_table.json`); the benchmark `bench/profiles.py` writes it. Each run records one
profile measured under one allocator cap on a GPU. A profile is chosen for a class only from a run
that completed under a cap no larger than the class's cap with peak reserved VRAM at least
`HEADROOM_GIB` below it, and whose host RSS fits the machine: never from folklore. A run made under a
host-memory limit (bench/memory_limit.py) has the RSS that limit allowed: the kernel reclaimed the
checkpoint's file pages to stay under it, which peak RSS otherwise counts in full.

A lossy profile (fp8 weights or matmuls, another attention kernel: the row's `lossy`) is chosen only
when the benchmark compared its images with the bf16 reference on the same seeds and found them not
visibly different (the row's `fidelity`), unless the operator allows lossy profiles
(`ZFARM_ALLOW_LOSSY`). A lossy profile never compared counts as visibly different.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from shared import keys
from shared.schema import PRIORITIES, SIDE_MAX_PX

# VRAM classes in GB, and the allocator cap (GiB) a card of that class can use: the card's total
# less the CUDA context and driver reservations. The benchmark measures under these caps.
CLASS_CAPS_GIB = {8: 7.0, 12: 11.0, 16: 15.0, 24: 23.0, 48: 47.0, 80: 79.0}
GPU_CLASSES = tuple(sorted(CLASS_CAPS_GIB))
CPU_CLASS = "cpu"
HEADROOM_GIB = 0.5
CLASS_REACH_FRACTION = 0.93
# What an uncapped benchmark run on the measuring card (an 80 GB H100) counts as.
UNCAPPED_RUN_GIB = CLASS_CAPS_GIB[80]
# Host memory the OS, Python and the worker need beside the profile's own RSS.
HOST_RESERVE_GIB = 2.0
CPU_MAX_PIXELS = 2048 * 2048
# The largest job the schema accepts.
JOB_MAX_PIXELS = SIDE_MAX_PX * SIDE_MAX_PX
# Pixels of the reference job the table's speeds are measured on (1024x1024, 8 steps).
REFERENCE_PIXELS = 1024 * 1024
REFERENCE_STEPS = 8

TABLE_ENV = "ZFARM_PROFILE_TABLE"
_PACKAGED_TABLE = Path(__file__).with_name("profile_table.json")


class ProfileError(ValueError):
    """Raised when no measured profile fits the requested class and host."""


def class_for_vram(total_gib: float) -> int | None:
    """The largest class the card's memory reaches, or None below the smallest.

    Cards report a little less than their name says (an "80 GB" H100 shows 79.2-79.6 GiB, a 16 GB
    card 15.6-16.0), so a card reaches class N with 93% of N GiB."""
    reached = [c for c in CLASS_CAPS_GIB if total_gib >= CLASS_REACH_FRACTION * c]
    return max(reached) if reached else None


def class_for_override(vram_gb: float) -> int:
    """--vram-gb N plays a card of N GB: the class whose cap fits N - 1 GiB usable."""
    reached = [c for c, cap in CLASS_CAPS_GIB.items() if vram_gb - 1.0 >= cap - 1e-9]
    if not reached:
        raise ProfileError(f"--vram-gb {vram_gb:g} is below the smallest class ({min(CLASS_CAPS_GIB)} GB)")
    return max(reached)


def class_label(vram_class) -> str:
    return CPU_CLASS if vram_class == CPU_CLASS else f"{vram_class}g"


@dataclass(frozen=True)
class Choice:
    vram_class: object  # int GB class, or "cpu"
    profile: str
    s_per_image: float | None
    peak_reserved_gib: float | None
    host_rss_gib: float | None
    max_pixels: int
    cap_gib: float | None
    measured_cap_gib: float | None = None
    lossy: bool = False
    psnr_db_min: float | None = None   # worst seed against the bf16 reference, when compared

    def to_dict(self) -> dict:
        return asdict(self)


def load_table(path: str | os.PathLike | None = None) -> dict:
    path = Path(path or os.environ.get(TABLE_ENV) or _PACKAGED_TABLE)
    if not path.exists():
        return {"runs": [], "profiles": {}, "measured": {}, "source": str(path)}
    table = json.loads(path.read_text())
    table.setdefault("source", str(path))
    return table


def _measured_cap(run: dict) -> float:
    """The cap a run was measured under; an uncapped run had the whole measuring card."""
    return UNCAPPED_RUN_GIB if run.get("cap_gib") is None else run["cap_gib"]


def _fits(run: dict, cap_gib: float, ram_gib: float | None) -> bool:
    if not run.get("ok") or run.get("s_per_image") is None or run.get("peak_reserved_gib") is None:
        return False
    # An uncapped run had the whole measuring card (an 80 GB H100): it is evidence for that class
    # only. Its peak may look small, but its max_pixels was found with all that memory.
    if _measured_cap(run) > cap_gib + 1e-9:
        return False
    if run["peak_reserved_gib"] > cap_gib - HEADROOM_GIB:
        return False
    if ram_gib is not None and run.get("host_rss_gib") is not None:
        if run["host_rss_gib"] > ram_gib - HOST_RESERVE_GIB:
            return False
    return True


def _faithful(run: dict, allow_lossy: bool) -> bool:
    if allow_lossy or not run.get("lossy"):
        return True
    fidelity = run.get("fidelity") or {}
    return fidelity.get("visibly_different") is False


def candidates(table: dict, vram_class, ram_gib: float | None = None, allow_lossy: bool = False) -> list[Choice]:
    """Every measured profile that fits the class and host (and the fidelity rule), fastest first."""
    if vram_class == CPU_CLASS:
        return [_cpu_choice(table)]
    cap = CLASS_CAPS_GIB[vram_class]
    # A profile measured under several caps that fit speaks through its run under the largest one: the
    # measurement closest to this class, and the one whose largest image size the class can take (the
    # fastest run would do, but an 80 GB card would then serve only the sizes a 23 GiB cap reached).
    closest: dict[str, dict] = {}
    for run in table.get("runs", []):
        if run.get("profile") == CPU_CLASS or not _fits(run, cap, ram_gib) or not _faithful(run, allow_lossy):
            continue
        held = closest.get(run["profile"])
        if held is None or _measured_cap(run) > _measured_cap(held):
            closest[run["profile"]] = run
    out = []
    for run in sorted(closest.values(), key=lambda r: (r["s_per_image"], -(r.get("max_pixels") or 0))):
        out.append(Choice(vram_class=vram_class, profile=run["profile"], s_per_image=run["s_per_image"],
                          peak_reserved_gib=run["peak_reserved_gib"], host_rss_gib=run.get("host_rss_gib"),
                          max_pixels=int(run.get("max_pixels") or REFERENCE_PIXELS), cap_gib=cap,
                          measured_cap_gib=run.get("cap_gib"), lossy=bool(run.get("lossy")),
                          psnr_db_min=(run.get("fidelity") or {}).get("psnr_db_min")))
    return out


def _cpu_choice(table: dict) -> Choice:
    run = next((r for r in table.get("runs", []) if r.get("profile") == CPU_CLASS and r.get("ok")), {})
    return Choice(vram_class=CPU_CLASS, profile=CPU_CLASS, s_per_image=run.get("s_per_image"),
                  peak_reserved_gib=None, host_rss_gib=run.get("host_rss_gib"),
                  max_pixels=CPU_MAX_PIXELS, cap_gib=None)


# Speeds this close to the fastest are measurement noise (one profile's runs differ by ~3%): among
# them the profile that renders the largest images wins, so that the card serves its widest size tier.
SPEED_TIE_FRACTION = 0.05


def _prefer_reach(found: list[Choice]) -> Choice:
    fastest = found[0].s_per_image
    ties = [c for c in found if c.s_per_image <= fastest * (1 + SPEED_TIE_FRACTION)]
    return max(ties, key=lambda c: (c.max_pixels, -c.s_per_image))


def choose(table: dict, vram_class, ram_gib: float | None = None, forced: str = "",
           allow_lossy: bool = False) -> Choice:
    """The fastest fitting profile, or the forced one (measured or not, on the user's word)."""
    if forced:
        if vram_class == CPU_CLASS or forced == CPU_CLASS:
            return Choice(vram_class, forced, None, None, None, CPU_MAX_PIXELS, None)
        for choice in candidates(table, vram_class, ram_gib=None, allow_lossy=True):
            if choice.profile == forced:
                return choice
        return Choice(vram_class, forced, None, None, None, REFERENCE_PIXELS, CLASS_CAPS_GIB[vram_class])
    found = candidates(table, vram_class, ram_gib, allow_lossy)
    if not found:
        raise ProfileError(
            f"no measured profile fits class {class_label(vram_class)} "
            f"(cap {CLASS_CAPS_GIB.get(vram_class)} GiB) with {ram_gib} GiB host RAM in {table.get('source')}"
            f"{'' if allow_lossy else ' among those that keep images as bf16 renders them (ZFARM_ALLOW_LOSSY=1 admits the rest)'}; "
            "measure one with bench/profiles.py or force one with --profile")
    return found[0] if vram_class == CPU_CLASS else _prefer_reach(found)


def step_down(table: dict, vram_class, current: str, ram_gib: float | None = None,
              allow_lossy: bool = False) -> Choice | None:
    """The next profile after `current` that needs less peak VRAM, for an out-of-memory retry."""
    found = candidates(table, vram_class, ram_gib, allow_lossy)
    current_peak = next((c.peak_reserved_gib for c in found if c.profile == current), None)
    lower = [c for c in found if c.profile != current
             and (current_peak is None or (c.peak_reserved_gib or 0) < current_peak)]
    lower.sort(key=lambda c: (c.s_per_image, c.peak_reserved_gib or 0))
    return lower[0] if lower else None


def class_table(table: dict, ram_gib: float | None = None, allow_lossy: bool = False) -> list[dict]:
    """One row per class: the profile the chooser would take there (or why none)."""
    rows = []
    for vram_class in GPU_CLASSES:
        try:
            rows.append(choose(table, vram_class, ram_gib, allow_lossy=allow_lossy).to_dict())
        except ProfileError as exc:
            rows.append({"vram_class": vram_class, "profile": None, "s_per_image": None,
                         "peak_reserved_gib": None, "host_rss_gib": None, "max_pixels": 0,
                         "cap_gib": CLASS_CAPS_GIB[vram_class], "error": str(exc)})
    rows.append(_cpu_choice(table).to_dict())
    return rows


def max_pixels_by_class(table: dict) -> dict:
    return {row["vram_class"]: row["max_pixels"] for row in class_table(table) if row.get("profile")}


def tier_ceilings(max_pixels: dict) -> dict[str, int]:
    """Every size tier the table implies, with the largest job it holds, smallest tier first.

    A tier is a level of `max_pixels`: "any" holds the jobs every GPU class renders (up to the
    smallest class's max_pixels); each larger level is named "c<N>" after the smallest class that
    reaches it; "c0" holds jobs above every class on record (up to the largest job the schema
    allows), which only a worker that renders any size can take. Classes sharing a level share
    its tier, so workers consume no queue that can never fill.

    E.g. {12: 1024², 16: 1024², 24: 2048², 48: 2048²} gives {"any": 1024², "c24": 2048²}."""
    gpu = sorted((px, c) for c, px in max_pixels.items() if c != CPU_CLASS)
    if not gpu:
        return {keys.SHARED_TIER: JOB_MAX_PIXELS}
    ceilings = {keys.SHARED_TIER: gpu[0][0]}
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
              if tier != keys.SHARED_TIER and ceiling <= worker_max_pixels]
    return larger[::-1] + [keys.SHARED_TIER]


def queue_rank(queue: str, ceilings: dict[str, int]) -> tuple[int, int]:
    """Where a queue stands in the order workers serve queues: priority first (high, normal, low),
    then the tier of the largest jobs first (by `tier_ceilings`), the shared tier last. Lanes of
    one priority and tier rank equal: they take turns. Queues that are not zfarm's come last.

    A worker's BRPOP names its queues in this order; the producer pushes a batch's queues in this
    order too, because Redis hands a client blocked on several lists the list pushed first in a
    transaction, not the one it named first."""
    parsed = keys.parse_queue(queue)
    if parsed is None or parsed[0] not in PRIORITIES:
        return (len(PRIORITIES), 0)
    priority, tier, _lane = parsed
    size_rank = 0 if tier == keys.SHARED_TIER else -ceilings.get(tier, 1)
    return (PRIORITIES.index(priority), size_rank)


# A job's hard time limit comes from the slowest class's measured speed, scaled to the job's size
# and steps, times a margin, plus a floor for VAE decode, upload and the first call's warm-up.
TIME_LIMIT_FLOOR_S = 120.0
# When nothing is measured yet, assume the common slow recipe (model CPU offload, ~18 s/img).
UNMEASURED_S_PER_IMAGE = 20.0


def work_units(pixels: int, steps: int) -> float:
    """A job's work relative to the reference 1024x1024 8-step image (linear in pixels and steps)."""
    return (pixels / REFERENCE_PIXELS) * (steps / REFERENCE_STEPS)


def slowest_s_per_image(table: dict) -> float:
    speeds = [row["s_per_image"] for row in class_table(table) if row.get("profile") and row.get("s_per_image")]
    return max(speeds) if speeds else UNMEASURED_S_PER_IMAGE


def job_time_limit_s(pixels: int, steps: int, table: dict, margin: float) -> float:
    return round(TIME_LIMIT_FLOOR_S + margin * slowest_s_per_image(table) * work_units(pixels, steps), 1)


def visibility_timeout_s(table: dict, margin: float) -> float:
    """Longer than the longest job any worker may run, so a healthy job is never delivered twice."""
    from shared.schema import SIDE_MAX_PX, STEPS_MAX

    return job_time_limit_s(SIDE_MAX_PX * SIDE_MAX_PX, STEPS_MAX, table, margin) + 60.0
