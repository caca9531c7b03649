"""The job schema: what a render job is, its bounds, and its JSON form on the wire.

The producer validates every job before anything is queued; the worker validates the same
message again when it arrives, because Redis is writable by others. Both use `Job.from_wire`.
"""
from __future__ import annotations

import math
import re
import secrets
import time
from dataclasses import asdict, dataclass, field

from shared.errors import JobError

SCHEMA_VERSION = 1

PROMPT_MAX_CHARS = 2000
SIDE_MIN_PX, SIDE_MAX_PX, SIDE_STEP_PX = 256, 2048, 16
STEPS_MIN, STEPS_MAX, STEPS_DEFAULT = 1, 50, 8
GUIDANCE_MIN, GUIDANCE_MAX, GUIDANCE_DEFAULT = 0.0, 20.0, 0.0
SEED_MAX = 2**63 - 1
SIDE_DEFAULT_PX = 1024
PRIORITIES = ("high", "normal", "low")
# A wire message larger than this is refused before it is parsed further: no valid job
# comes near it (2,000-character prompts), and a worker must not spend memory on junk.
WIRE_MAX_BYTES = 64 * 1024

SPEC_FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")




def _int_field(raw: dict, name: str, lo: int, hi: int, default) -> int:
    value = raw.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise JobError(name, f"must be an integer, got {type(value).__name__}")
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[+-]?\d+", text):
            raise JobError(name, f"must be an integer, got {value!r}")
        value = int(text)
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise JobError(name, f"must be an integer, got {value!r}")
        value = int(value)
    if not lo <= value <= hi:
        raise JobError(name, f"must be in [{lo}, {hi}], got {value}")
    return value


def _float_field(raw: dict, name: str, lo: float, hi: float, default: float) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise JobError(name, f"must be a number, got {type(value).__name__}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise JobError(name, f"must be a number, got {value!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise JobError(name, f"must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise JobError(name, f"must be in [{lo:g}, {hi:g}], got {value:g}")
    return value


def _text_field(raw: dict, name: str, required: bool) -> str:
    value = raw.get(name, "" if not required else None)
    if value is None:
        if required:
            raise JobError(name, "is required")
        value = ""
    if not isinstance(value, str):
        raise JobError(name, f"must be a string, got {type(value).__name__}")
    if len(value) > PROMPT_MAX_CHARS:
        raise JobError(name, f"is {len(value)} characters; at most {PROMPT_MAX_CHARS}")
    if "\x00" in value:
        raise JobError(name, "contains a NUL character")
    if required and not value.strip():
        raise JobError(name, "is empty")
    return value


def _side_field(raw: dict, name: str) -> int:
    value = _int_field(raw, name, SIDE_MIN_PX, SIDE_MAX_PX, SIDE_DEFAULT_PX)
    if value % SIDE_STEP_PX:
        raise JobError(name, f"must be a multiple of {SIDE_STEP_PX}, got {value}")
    return value


@dataclass(frozen=True)
class JobSpec:
    """What to render. Every field is bounded; `seed` is always set once validated."""

    prompt: str
    negative_prompt: str = ""
    width: int = SIDE_DEFAULT_PX
    height: int = SIDE_DEFAULT_PX
    steps: int = STEPS_DEFAULT
    guidance: float = GUIDANCE_DEFAULT
    seed: int = 0

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @classmethod
    def from_dict(cls, raw: dict, defaults: dict | None = None, draw_seed: bool = True) -> "JobSpec":
        """Validate `raw` over `defaults`. Unknown keys are refused, so typos do not pass silently."""
        if not isinstance(raw, dict):
            raise JobError("job", f"must be an object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(SPEC_FIELDS))
        if unknown:
            raise JobError(unknown[0], f"unknown field (known: {', '.join(SPEC_FIELDS)})")
        merged = {k: v for k, v in (defaults or {}).items() if v is not None}
        merged.update({k: v for k, v in raw.items() if v is not None and v != ""} )
        if "prompt" in raw:
            merged["prompt"] = raw["prompt"]
        seed = _int_field(merged, "seed", 0, SEED_MAX, None)
        if seed is None:
            if not draw_seed:
                raise JobError("seed", "is required")
            seed = secrets.randbits(63)
        return cls(
            prompt=_text_field(merged, "prompt", required=True),
            negative_prompt=_text_field(merged, "negative_prompt", required=False),
            width=_side_field(merged, "width"),
            height=_side_field(merged, "height"),
            steps=_int_field(merged, "steps", STEPS_MIN, STEPS_MAX, STEPS_DEFAULT),
            guidance=_float_field(merged, "guidance", GUIDANCE_MIN, GUIDANCE_MAX, GUIDANCE_DEFAULT),
            seed=seed,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def check_id(value, field_name: str = "batch_id") -> str:
    """Ids become storage keys and Redis keys: letters, digits, '-' and '_' only."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise JobError(field_name, f"must match {_ID_RE.pattern}, got {value!r:.80}")
    return value


def check_name(value: str, field_name: str = "name") -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value) or ".." in value:
        raise JobError(field_name, f"must be 1-100 of letters, digits, '.', '_', '-' (no '..'), got {value!r:.80}")
    return value


def new_batch_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def job_id(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index:06d}"


@dataclass(frozen=True)
class Job:
    """One render job as it travels from producer to worker."""

    batch_id: str
    index: int
    spec: JobSpec
    priority: str = "normal"
    tier: str = "any"
    version: int = SCHEMA_VERSION
    submitted_at: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return job_id(self.batch_id, self.index)

    def to_wire(self) -> dict:
        return {"version": self.version, "batch_id": self.batch_id, "index": self.index,
                "priority": self.priority, "tier": self.tier, "submitted_at": self.submitted_at,
                "spec": self.spec.to_dict()}

    @classmethod
    def from_wire(cls, raw) -> "Job":
        """Validate a wire message. Raises JobError naming the first bad field."""
        if not isinstance(raw, dict):
            raise JobError("job", f"must be a JSON object, got {type(raw).__name__}")
        version = raw.get("version")
        if version != SCHEMA_VERSION:
            raise JobError("version", f"schema version {version!r:.40} is not supported (expected {SCHEMA_VERSION})")
        unknown = sorted(set(raw) - {"version", "batch_id", "index", "priority", "tier", "submitted_at", "spec"})
        if unknown:
            raise JobError(str(unknown[0])[:40], "unknown field")
        batch_id = check_id(raw.get("batch_id"))
        index = _int_field(raw, "index", 0, 10**9, None)
        if index is None:
            raise JobError("index", "is required")
        priority = raw.get("priority", "normal")
        if priority not in PRIORITIES:
            raise JobError("priority", f"must be one of {', '.join(PRIORITIES)}, got {priority!r:.40}")
        tier = check_id(raw.get("tier", "any"), "tier")
        submitted_at = _float_field(raw, "submitted_at", 0, 1e11, 0.0)
        spec = JobSpec.from_dict(raw.get("spec"), draw_seed=False)
        return cls(batch_id=batch_id, index=index, spec=spec, priority=priority, tier=tier,
                   submitted_at=submitted_at)
