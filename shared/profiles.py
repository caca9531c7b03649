"""VRAM classes, the measured profile table, and the chooser that reads it.

No torch here: routing (`shared.routing`) reads `max_pixels` per class from it, and `zfarm profiles`
prints it. What each profile does is `worker.engine.specs`; how it is applied, `worker.engine.placement`.

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

from shared.errors import NoProfileFits, ProfileError

# VRAM classes in GB, and the allocator cap (GiB) a card of that class can use: the card's total
# less the CUDA context and driver reservations. The benchmark measures under these caps.
CLASS_CAPS_GIB = {8: 7.0, 12: 11.0, 16: 15.0, 24: 23.0, 48: 47.0, 80: 79.0}
GPU_CLASSES = tuple(sorted(CLASS_CAPS_GIB))
CPU_CLASS = "cpu"
HEADROOM_GIB = 0.5
CLASS_REACH_FRACTION = 0.93
# What an uncapped benchmark run counts as: the whole of the measuring card, an 80 GB one.
UNCAPPED_RUN_GIB = CLASS_CAPS_GIB[80]
# Host memory the OS, Python and the worker need beside the profile's own RSS.
HOST_RESERVE_GIB = 2.0
CPU_MAX_PIXELS = 2048 * 2048
# Pixels of the reference job the table's speeds are measured on (1024x1024, 8 steps).
REFERENCE_PIXELS = 1024 * 1024
REFERENCE_STEPS = 8

_PACKAGED_TABLE = Path(__file__).with_name("profile_table.json")




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
    requires: tuple = ()               # capabilities the profile needs (`shared.archs`)
    measured_on: str = ""              # the card, arch and torch of the run this choice rests on

    def to_dict(self) -> dict:
        out = asdict(self)
        out["requires"] = list(self.requires)
        return out


def load_table(path: str | os.PathLike | None = None) -> dict:
    """The table at `path` (`Settings.profile_table`), or the one shipped with zfarm when it is empty."""
    path = Path(path or _PACKAGED_TABLE)
    if not path.exists():
        return {"runs": [], "profiles": {}, "measured": {}, "source": str(path)}
    table = json.loads(path.read_text())
    table.setdefault("source", str(path))
    return table


def _measured_cap(run: dict) -> float:
    """The cap a run was measured under; an uncapped run had the whole measuring card."""
    return UNCAPPED_RUN_GIB if run.get("cap_gib") is None else run["cap_gib"]


def _unfit(run: dict, cap_gib: float, ram_gib: float | None) -> str:
    """Why this run is no evidence that its profile fits the class and host, or "" when it is."""
    if not run.get("ok") or run.get("s_per_image") is None or run.get("peak_reserved_gib") is None:
        return f"its run failed: {run.get('error') or 'no speed or memory recorded'}"[:200]
    # An uncapped run had the whole measuring card (80 GB): it is evidence for that class
    # only. Its peak may look small, but its max_pixels was found with all that memory.
    if _measured_cap(run) > cap_gib + 1e-9:
        return f"measured only with {_measured_cap(run):g} GiB, more than this class's cap of {cap_gib:g} GiB"
    if run["peak_reserved_gib"] > cap_gib - HEADROOM_GIB:
        return (f"peak {run['peak_reserved_gib']:g} GiB of VRAM leaves less than {HEADROOM_GIB:g} GiB of the "
                f"{cap_gib:g} GiB cap")
    if ram_gib is not None and run.get("host_rss_gib") is not None:
        if run["host_rss_gib"] > ram_gib - HOST_RESERVE_GIB:
            return (f"needs {run['host_rss_gib']:g} GiB of host RAM; {ram_gib:g} GiB less {HOST_RESERVE_GIB:g} "
                    f"for the system leaves {ram_gib - HOST_RESERVE_GIB:g}")
    return ""


def _unfaithful(run: dict, allow_lossy: bool) -> str:
    if allow_lossy or not run.get("lossy"):
        return ""
    fidelity = run.get("fidelity") or {}
    if fidelity.get("visibly_different") is False:
        return ""
    if not fidelity:
        return "lossy and never compared with bf16 (ZFARM_ALLOW_LOSSY=1 admits it)"
    return (f"its images differ visibly from bf16 ({fidelity.get('psnr_db_min')} dB; ZFARM_ALLOW_LOSSY=1 "
            "admits it)")


def _unsupported(run: dict, caps) -> str:
    """Why the card `caps` describes cannot run this row's profile, or ""."""
    if caps is None:
        return ""
    missing = caps.missing(run.get("requires") or ())
    return f"needs {', '.join(missing)}, which {caps.arch} does not offer" if missing else ""


def measured_on(run: dict) -> str:
    """"NVIDIA H100 80GB HBM3 (sm_90), torch 2.11.0+cu130, cap 11 GiB": what a row's run rests on."""
    where = run.get("device") or "an unrecorded card"
    arch = run.get("arch") or "arch not recorded"
    emulated = f", emulating {run['emulated_arch']}" if run.get("emulated_arch") else ""
    cap = f", cap {run['cap_gib']:g} GiB" if run.get("cap_gib") is not None else ", no cap"
    host = f", host limit {run['host_memory_limit_gib']:g} GiB" if run.get("host_memory_limit_gib") else ""
    torch = f", torch {run['torch']}" if run.get("torch") else ""
    return f"{where} ({arch}{emulated}){torch}{cap}{host}"


def _arch_rank(run: dict, caps) -> int:
    """Rows that speak for this card's architecture first: emulated as it, then measured on it."""
    if caps is None:
        return 0
    if run.get("emulated_arch") == caps.arch:
        return 2
    return 1 if run.get("arch") == caps.arch and not run.get("emulated_arch") else 0


def assess(table: dict, vram_class, ram_gib: float | None = None, allow_lossy: bool = False,
           caps=None) -> tuple[list[Choice], list[dict]]:
    """(every measured profile that fits the class and host, meets the card's capabilities `caps`
    (a `shared.archs.Capabilities`; None judges no card) and the fidelity rule, fastest first;
    every other profile of the table, each with the reason it was left out)."""
    if vram_class == CPU_CLASS:
        return [_cpu_choice(table)], []
    cap = CLASS_CAPS_GIB[vram_class]
    # A profile measured under several caps that fit speaks through its run under the largest one: the
    # measurement closest to this class, and the one whose largest image size the class can take (the
    # fastest run would do, but an 80 GB card would then serve only the sizes a 23 GiB cap reached).
    closest: dict[str, dict] = {}
    why_not: dict[str, str] = {}
    for run in table.get("runs", []):
        name = run.get("profile")
        if name == CPU_CLASS:
            continue
        reason = _unsupported(run, caps) or _unfit(run, cap, ram_gib) or _unfaithful(run, allow_lossy)
        if reason:
            why_not.setdefault(name, reason)
            continue
        held = closest.get(name)
        if held is None or (_arch_rank(run, caps), _measured_cap(run)) > (_arch_rank(held, caps), _measured_cap(held)):
            closest[name] = run
    out = []
    for run in sorted(closest.values(), key=lambda r: (r["s_per_image"], -(r.get("max_pixels") or 0))):
        out.append(Choice(vram_class=vram_class, profile=run["profile"], s_per_image=run["s_per_image"],
                          peak_reserved_gib=run["peak_reserved_gib"], host_rss_gib=run.get("host_rss_gib"),
                          max_pixels=int(run.get("max_pixels") or REFERENCE_PIXELS), cap_gib=cap,
                          measured_cap_gib=run.get("cap_gib"), lossy=bool(run.get("lossy")),
                          psnr_db_min=(run.get("fidelity") or {}).get("psnr_db_min"),
                          requires=tuple(run.get("requires") or ()), measured_on=measured_on(run)))
    never = sorted(set(table.get("profiles", {})) - set(closest) - set(why_not) - {CPU_CLASS})
    excluded = [{"profile": name, "reason": why_not[name]} for name in sorted(set(why_not) - set(closest))]
    excluded += [{"profile": name, "reason": "never measured"} for name in never]
    return out, excluded


def candidates(table: dict, vram_class, ram_gib: float | None = None, allow_lossy: bool = False,
               caps=None) -> list[Choice]:
    """Every measured profile that fits the class and host, the card and the fidelity rule, fastest first."""
    return assess(table, vram_class, ram_gib, allow_lossy, caps)[0]


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
           allow_lossy: bool = False, caps=None) -> Choice:
    """The fastest fitting profile the card can run, or the forced one (measured or not, on the user's word)."""
    if forced:
        if vram_class == CPU_CLASS or forced == CPU_CLASS:
            return Choice(vram_class, forced, None, None, None, CPU_MAX_PIXELS, None)
        for choice in candidates(table, vram_class, ram_gib=None, allow_lossy=True):
            if choice.profile == forced:
                return choice
        return Choice(vram_class, forced, None, None, None, REFERENCE_PIXELS, CLASS_CAPS_GIB[vram_class])
    found = candidates(table, vram_class, ram_gib, allow_lossy, caps)
    if not found:
        card = f" on {caps.arch}" if caps is not None else ""
        raise NoProfileFits(
            f"no measured profile fits class {class_label(vram_class)}{card} "
            f"(cap {CLASS_CAPS_GIB.get(vram_class)} GiB) with {ram_gib} GiB host RAM in {table.get('source')}"
            f"{'' if allow_lossy else ' among those that keep images as bf16 renders them (ZFARM_ALLOW_LOSSY=1 admits the rest)'}; "
            "measure one with bench/profiles.py or force one with --profile")
    return found[0] if vram_class == CPU_CLASS else _prefer_reach(found)


def fallbacks(table: dict, chosen: Choice, ram_gib: float | None = None, allow_lossy: bool = False,
              caps=None) -> list[Choice]:
    """The profiles a worker steps down to, in order, when `chosen` fails its boot self-test: every other
    candidate, fastest first. A forced profile has none: the operator asked for that one."""
    return [c for c in candidates(table, chosen.vram_class, ram_gib, allow_lossy, caps) if c.profile != chosen.profile]


def step_down(table: dict, vram_class, current: str, ram_gib: float | None = None,
              allow_lossy: bool = False, caps=None) -> Choice | None:
    """The next profile after `current` that needs less peak VRAM, for an out-of-memory retry."""
    found = candidates(table, vram_class, ram_gib, allow_lossy, caps)
    current_peak = next((c.peak_reserved_gib for c in found if c.profile == current), None)
    lower = [c for c in found if c.profile != current
             and (current_peak is None or (c.peak_reserved_gib or 0) < current_peak)]
    lower.sort(key=lambda c: (c.s_per_image, c.peak_reserved_gib or 0))
    return lower[0] if lower else None


def class_table(table: dict, ram_gib: float | None = None, allow_lossy: bool = False, caps=None) -> list[dict]:
    """One row per class: the profile the chooser would take there (or why none)."""
    rows = []
    for vram_class in GPU_CLASSES:
        try:
            rows.append(choose(table, vram_class, ram_gib, allow_lossy=allow_lossy, caps=caps).to_dict())
        except ProfileError as exc:
            rows.append({"vram_class": vram_class, "profile": None, "s_per_image": None,
                         "peak_reserved_gib": None, "host_rss_gib": None, "max_pixels": 0,
                         "cap_gib": CLASS_CAPS_GIB[vram_class], "error": str(exc)})
    rows.append(_cpu_choice(table).to_dict())
    return rows


def max_pixels_by_class(table: dict) -> dict:
    """The largest image each class's chosen profile renders: what routing builds its tiers from."""
    return {row["vram_class"]: row["max_pixels"] for row in class_table(table) if row.get("profile")}
