"""The quality gate's shared vocabulary: the probe set, the pass rule, where references and results are
stored, and the `quality` block that registry entries, `zfarm workers`, Flower and sidecars show.

No torch and no numpy here: the producer reads quality blocks, and the worker's gate
(`worker.calibration`) and the engine's metrics (`worker.engine.quality`) agree through this module.

The probe set is `shared/calibration_probes.json`, versioned: references and cached results are kept
per version, size and step count, so a changed probe never compares against an old reference. Why the
thresholds are what they are is in docs/quality.md.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from shared.errors import SettingsError

PROBES_FILE = Path(__file__).with_name("calibration_probes.json")
# Storage names under the farm's prefix. Batch ids start with a letter or digit, so nothing here can
# meet a batch's results.
STORAGE_PREFIX = "_calibration"
# A PSNR of identical images is infinite; JSON has no infinity, so it is reported as this.
PSNR_IDENTICAL_DB = 100.0
# What a quality block's `status` says.
PASSED, FAILED, SKIPPED, LOSSLESS, NOT_APPLICABLE = "passed", "failed", "skipped", "lossless", "not-applicable"
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class Probe:
    id: str
    prompt: str
    seed: int
    covers: str = ""


@dataclass(frozen=True)
class ProbeSet:
    version: int
    probes: tuple[Probe, ...]
    size_px: int
    steps: int

    @property
    def key(self) -> str:
        """What references and results of this set are stored under: version, size, steps, and which probes."""
        ids = hashlib.sha256(",".join(p.id for p in self.probes).encode()).hexdigest()[:8]
        return f"v{self.version}-{self.size_px}px-{self.steps}steps-{ids}"


def load_probes(count: int = 0, size_px: int = 1024, steps: int = 8, path: Path = PROBES_FILE) -> ProbeSet:
    """The probe set: its first `count` probes (0: all of them) rendered at `size_px` square in `steps` steps."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    probes = tuple(Probe(p["id"], p["prompt"], int(p["seed"]), p.get("covers", "")) for p in raw["probes"])
    if count < 0 or count > len(probes):
        raise SettingsError(f"ZFARM_CALIBRATION_PROBES: {count} is not between 0 and {len(probes)}")
    return ProbeSet(int(raw["version"]), probes[:count] if count else probes, size_px, steps)


@dataclass(frozen=True)
class Thresholds:
    """The pass rule: every probe at least `probe_psnr_db` and `probe_ssim`, and the probes' means at
    least `psnr_db` and `ssim`."""

    psnr_db: float
    ssim: float
    probe_psnr_db: float
    probe_ssim: float

    @classmethod
    def from_settings(cls, settings) -> "Thresholds":
        return cls(settings.calibration_psnr_db, settings.calibration_ssim, settings.calibration_probe_psnr_db,
                   settings.calibration_probe_ssim)

    def to_dict(self) -> dict:
        return {"psnr_db": self.psnr_db, "ssim": self.ssim, "probe_psnr_db": self.probe_psnr_db,
                "probe_ssim": self.probe_ssim}


def judge(measured: list[dict], thresholds: Thresholds) -> dict:
    """The verdict on `measured` ({id, psnr_db, ssim} per probe; NaN where the image was not finite):
    each probe's `passed`, the means and worst values, and the top-level `passed`. Made again from the
    stored metrics whenever a cached result is read, so a changed threshold applies at once."""
    probes = []
    for m in measured:
        psnr, ssim = m["psnr_db"], m["ssim"]
        ok = _finite(psnr) and _finite(ssim) and psnr >= thresholds.probe_psnr_db and ssim >= thresholds.probe_ssim
        probes.append({"id": m["id"], "psnr_db": _round(psnr, 2), "ssim": _round(ssim, 4), "passed": ok})
    finite = all(_finite(m["psnr_db"]) and _finite(m["ssim"]) for m in measured)
    psnr_mean = sum(m["psnr_db"] for m in measured) / len(measured) if finite and measured else None
    ssim_mean = sum(m["ssim"] for m in measured) / len(measured) if finite and measured else None
    passed = bool(measured) and finite and all(p["passed"] for p in probes) \
        and psnr_mean >= thresholds.psnr_db and ssim_mean >= thresholds.ssim
    return {"passed": passed, "probes": probes,
            "psnr_db_mean": _round(psnr_mean, 2), "ssim_mean": _round(ssim_mean, 4),
            "psnr_db_min": min((p["psnr_db"] for p in probes), default=None, key=_nan_low),
            "ssim_min": min((p["ssim"] for p in probes), default=None, key=_nan_low),
            "thresholds": thresholds.to_dict()}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def _round(x, digits: int):
    if x is None:
        return None
    return round(x, digits) if _finite(x) else None   # NaN travels as null: JSON has no NaN


def _nan_low(x) -> float:
    return float("-inf") if x is None else x


def quality_block(status: str, policy: str = "", result: dict | None = None, reference: str = "",
                  calibrated_at: float | None = None, cached: bool = False, reason: str = "") -> dict:
    """The `quality` a worker shows everywhere: worst probe's PSNR and SSIM, the reference compared
    against, the layer policy in force, and when it was calibrated; `status` says which case applies
    (passed, failed, skipped, lossless, not-applicable) and `reason` why, where it helps."""
    result = result or {}
    block = {"status": status, "psnr_db": result.get("psnr_db_min"), "ssim": result.get("ssim_min"),
             "reference": reference, "policy": policy, "calibrated_at": calibrated_at}
    if result:
        block.update(psnr_db_mean=result.get("psnr_db_mean"), ssim_mean=result.get("ssim_mean"),
                     probes=len(result.get("probes", [])))
    if cached:
        block["cached"] = True
    if reason:
        block["reason"] = reason
    return block


def summary(quality: dict | None) -> str:
    """One cell for `zfarm workers`: "passed 31.2 dB/0.97 (edges)", "skipped (blocks)", "lossless"...: the
    status, the worst probe's PSNR and SSIM where measured, and the policy where one applies."""
    if not quality:
        return ""
    text = quality.get("status", "")
    if text in (PASSED, FAILED) and quality.get("psnr_db") is not None:
        text += f" {quality['psnr_db']:.1f} dB/{quality.get('ssim') or 0:.2f}"
    policy = quality.get("policy")
    return f"{text} ({policy})" if policy and policy != "none" else text


def reference_label(provenance: dict) -> str:
    """How a quality block names the references: what rendered them, where, with which torch, when."""
    made = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(provenance.get("made_at", 0)))
    return (f"{provenance.get('profile')} on {provenance.get('gpu')} ({provenance.get('arch')}), "
            f"torch {provenance.get('versions', {}).get('torch')}, {made}")


# Storage names (relative to the farm's storage prefix)
def _safe(text: str) -> str:
    return _SAFE.sub("_", str(text))[:120] or "_"


def references_folder(revision: str, probe_set: ProbeSet) -> str:
    return f"{STORAGE_PREFIX}/{_safe(revision)}/references/{probe_set.key}"


def reference_name(revision: str, probe_set: ProbeSet, probe_id: str) -> str:
    return f"{references_folder(revision, probe_set)}/{_safe(probe_id)}.png"


def provenance_name(revision: str, probe_set: ProbeSet) -> str:
    """Written last, after every probe's PNG: its presence means the reference set is whole."""
    return f"{references_folder(revision, probe_set)}/provenance.json"


def result_name(revision: str, probe_set: ProbeSet, profile: str, policy: str, arch: str, torch: str) -> str:
    return (f"{STORAGE_PREFIX}/{_safe(revision)}/results/{probe_set.key}/{_safe(profile)}+{_safe(policy)}/"
            f"{_safe(arch)}+torch{_safe(torch)}.json")
