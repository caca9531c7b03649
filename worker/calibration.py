"""The quality gate, on the worker's side: references and results in the farm's storage, the cache in
Redis, and the verdict that decides whether a lossy profile may serve.

At boot the rendering process (`worker.loading`) makes a `Gate`, lets it `prepare` (references exist
before a lossy profile is judged: read, waited for, or rendered here with a lossless profile, once for
the whole farm, with their provenance), then
hands `Gate.judge` to the renderer's `load`, which calls it after each variant's self-test
(`worker.engine.diffusion`), and `Gate.known_failure`, which lets it skip, without loading them, the
variants whose cached verdict already fails. The judge:

- skipped (ZFARM_SKIP_CALIBRATION): nothing rendered; the quality block says "skipped";
- a lossless variant: never judged, nothing rendered; the block says "lossless";
- a lossy variant: its cached result for this (model revision, probe set, profile, policy, arch, torch)
  is read from Redis, else from storage, else the probes are rendered and compared with the references
  and the result is stored in both, so a fleet pays once. The verdict is made again from the stored
  PSNR and SSIM with today's thresholds (`shared.calibration.judge`). A failure raises QualityFailed, and
  the renderer steps to a safer variant, then to a lossless profile;
- a lossy variant with no references to judge it by: QualityFailed, with no safer variant worth trying:
  the worker serves a lossless profile, or stops with the reason (docs/quality.md).

`zfarm calibrate` (`worker.calibrate`) runs the same gate by hand. No torch at import: the engine is
imported where the gate renders.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import secrets
import time

import redis

from shared import calibration, keys, lua, profiles
from shared.calibration import FAILED, LOSSLESS, PASSED, SKIPPED, quality_block
from shared.errors import CalibrationError, QualityFailed, StorageError
from shared.redis_conn import connect
from shared.storage import open_storage, put_with_retry, with_retry

log = logging.getLogger(__name__)

# The reference maker's lock outlives the slowest reference run (a small card's lossless offload profile).
REFERENCE_LOCK_S = 3600.0
# How often a worker waiting for another's references looks whether they are stored.
REFERENCE_POLL_S = 2.0


class Gate:
    """The quality gate of one worker (or of `zfarm calibrate`) for its model, card and probe set."""

    def __init__(self, settings, boot, table: dict, worker_name: str, client=None, storage=None):
        from worker.engine.detect import package_version

        self.settings = settings
        self.boot = boot
        self.table = table
        self.worker_name = worker_name
        self._client = client
        self._storage = storage
        self.probe_set = calibration.load_probes(settings.calibration_probes, settings.calibration_size_px,
                                                 settings.calibration_steps)
        self.thresholds = calibration.Thresholds.from_settings(settings)
        self.torch = package_version("torch") or "unknown"
        self.arch = boot.arch or boot.device
        self.provenance: dict | None = None
        self._references: dict[str, bytes] | None = None
        self.last_result: dict = {}    # the verdict of the last lossy variant judged (`zfarm calibrate` prints it)

    # Opened on first use: a lossless worker, or one that skips the gate, never reads the model's files
    # for a revision nor touches storage.
    @functools.cached_property
    def revision(self) -> str:
        from worker.engine import model_source

        return model_source.model_revision(self.settings.model)

    @functools.cached_property
    def storage(self):
        try:
            return self._storage or open_storage(self.settings.storage_url, self.settings.s3_endpoint_url)
        except StorageError as exc:
            raise CalibrationError(f"the quality gate cannot open the farm's storage: {exc}") from exc

    @functools.cached_property
    def redis(self):
        return self._client or connect(self.settings.redis_url)

    def _redis(self, command: str, *args, **kwargs):
        """One Redis command of the gate's; an unreachable Redis stops the gate, never judges a profile."""
        try:
            return getattr(self.redis, command)(*args, **kwargs)
        except redis.RedisError as exc:
            raise CalibrationError(f"the quality gate cannot reach Redis: {exc}") from exc

    # Storage and cache
    def _retry(self, call, what: str):
        try:
            return with_retry(call, what, self.settings.upload_retry_s)
        except StorageError as exc:
            raise CalibrationError(f"the quality gate cannot reach the farm's storage: {exc}") from exc

    def _put(self, name: str, data: bytes, content_type: str) -> None:
        storage = self.storage
        try:
            put_with_retry(storage, name, data, content_type, self.settings.upload_retry_s)
        except StorageError as exc:
            raise CalibrationError(f"the quality gate cannot write to the farm's storage: {exc}") from exc

    def _stored(self, folder: str) -> set[str]:
        storage = self.storage
        return set(self._retry(lambda: storage.list(folder + "/"), f"listing {folder}"))

    def references(self) -> dict[str, bytes] | None:
        """{probe id: PNG} of this model revision's references for the probe set, or None while they are
        not all stored (their provenance is written last)."""
        if self._references is not None:
            return self._references
        folder = calibration.references_folder(self.revision, self.probe_set)
        provenance_name = calibration.provenance_name(self.revision, self.probe_set)
        if provenance_name not in self._stored(folder):
            return None
        self.provenance = json.loads(self._read(provenance_name))
        self._references = {p.id: self._read(calibration.reference_name(self.revision, self.probe_set, p.id))
                            for p in self.probe_set.probes}
        return self._references

    def _read(self, name: str) -> bytes:
        storage = self.storage
        return self._retry(lambda: storage.get(name), f"reading {name}")

    def store_references(self, pngs: dict[str, bytes], renderer) -> dict:
        """Store `pngs` (rendered by the lossless `renderer`) as the references, their provenance last."""
        for probe in self.probe_set.probes:
            self._put(calibration.reference_name(self.revision, self.probe_set, probe.id), pngs[probe.id],
                      "image/png")
        described = renderer.describe()
        provenance = {"model": self.settings.model, "revision": self.revision, "probe_set": self.probe_set.key,
                      "probe_set_version": self.probe_set.version, "size_px": self.probe_set.size_px,
                      "steps": self.probe_set.steps, "probes": [p.id for p in self.probe_set.probes],
                      "profile": described.get("profile"), "policy": described.get("policy"),
                      "gpu": self.boot.gpu, "arch": self.arch, "versions": described.get("versions", {}),
                      "made_by": self.worker_name, "made_at": time.time()}
        self._put(calibration.provenance_name(self.revision, self.probe_set),
                  json.dumps(provenance, indent=1).encode(), "application/json")
        self.provenance, self._references = provenance, dict(pngs)
        log.info("stored calibration references for %s (%s, %d probes) rendered with %s", self.revision,
                 self.probe_set.key, len(pngs), provenance["profile"])
        return provenance

    def reference_label(self) -> str:
        return calibration.reference_label(self.provenance) if self.provenance else ""

    def _cache_key(self, profile: str, policy_name: str) -> str:
        return keys.calibration_result(self.revision, self.probe_set.key, profile, policy_name, self.arch, self.torch)

    def _result_name(self, profile: str, policy_name: str) -> str:
        return calibration.result_name(self.revision, self.probe_set, profile, policy_name, self.arch, self.torch)

    def cached(self, profile: str, policy_name: str) -> dict | None:
        """The stored calibration of this variant on this card's arch and torch: Redis, else storage."""
        raw = self._redis("get", self._cache_key(profile, policy_name))
        if raw is None:
            name = self._result_name(profile, policy_name)
            if name not in self._stored(name.rpartition("/")[0]):
                return None
            raw = self._read(name)
            self._redis("set", self._cache_key(profile, policy_name), raw)
        return json.loads(raw)

    def remember(self, record: dict, pngs: dict[str, bytes]) -> None:
        """Store a calibration, with its probe images beside it (to look at), in storage and Redis."""
        name = self._result_name(record["profile"], record["policy"])
        folder = name[:-len(".json")]
        for probe_id, png in pngs.items():
            self._put(f"{folder}/{probe_id}.png", png, "image/png")
        raw = json.dumps(record, indent=1).encode()
        self._put(name, raw, "application/json")
        self._redis("set", self._cache_key(record["profile"], record["policy"]), raw)

    # References: found, waited for, or made
    def lossless_candidates(self) -> list[profiles.Choice]:
        """The lossless profiles this card can run, fastest first: what renders references here."""
        from worker.engine import specs

        if self.boot.device != "cuda":
            return [profiles.Choice(self.boot.vram_class, specs.CPU_PROFILE, None, None, None,
                                    profiles.CPU_MAX_PIXELS, None)]
        found = profiles.candidates(self.table, self.boot.vram_class, self.boot.host_ram_gib or None,
                                    allow_lossy=True, caps=self.boot.capabilities)
        return [c for c in found if not specs.lossy_on(c.profile, "cuda")]

    def prepare(self, make_renderer) -> None:
        """Before the worker's renderer loads: if its profile is lossy and this variant was never judged
        here, have references ready. Found in storage; else rendered by this worker with a lossless
        profile (ZFARM_CALIBRATION_MAKE_REFERENCES), one worker at a time; else waited for while another
        renders them, up to ZFARM_CALIBRATION_WAIT_S. With none at the end, the judge refuses lossy variants."""
        from worker.engine import specs

        chosen = self.boot.choice.profile
        if self.settings.skip_calibration or not specs.lossy_on(chosen, self.boot.device):
            return
        known = self.cached(chosen, specs.policy_of(chosen))
        if known is not None and calibration.judge(known["measured"], self.thresholds)["passed"]:
            return   # it passed here before: nothing to render, no reference needed
        if self.references() is not None:
            return
        lossless = self.lossless_candidates() if self.settings.calibration_make_references else []
        lock = keys.calibration_references_lock(self.revision, self.probe_set.key)
        deadline = time.monotonic() + self.settings.calibration_wait_s
        while self.references() is None:
            token = secrets.token_hex(8)
            if lossless and self._redis("set", lock, token, nx=True, px=int(REFERENCE_LOCK_S * 1000)):
                try:
                    self.make_references(make_renderer, lossless)
                except CalibrationError:
                    raise
                except Exception as exc:  # no lossless profile rendered here: lossy ones are refused, as without
                    log.error("rendering the calibration references failed: %s: %s", type(exc).__name__, exc)
                finally:
                    self._redis("eval", lua.source("release_lock"), 1, lock, token)
                return
            if not self._redis("exists", lock):
                if not lossless:
                    log.error("no calibration references for %s and none being rendered; this worker %s",
                              self.revision, "may not render them (ZFARM_CALIBRATION_MAKE_REFERENCES is off)"
                              if not self.settings.calibration_make_references else "runs no lossless profile")
                    return
                continue  # the maker just finished or gave up: look again, or take its place
            if time.monotonic() > deadline:
                log.error("gave up waiting %.0f s for the calibration references another worker renders",
                          self.settings.calibration_wait_s)
                return
            log.info("waiting for another worker's calibration references of %s", self.revision)
            time.sleep(REFERENCE_POLL_S)

    def make_references(self, make_renderer, lossless: list) -> dict:
        """Render the probes with the first of the `lossless` profiles (Choices) that passes its
        self-test, in a renderer of its own, store them, and free that renderer."""
        boot = dataclasses.replace(self.boot, choice=lossless[0], fallbacks=tuple(lossless[1:]))
        renderer = make_renderer(self.settings, boot)
        from worker.engine import quality

        log.info("rendering %d calibration references with %s", len(self.probe_set.probes), lossless[0].profile)
        try:
            renderer.load()
            return self.store_references(quality.render_probes(renderer, self.probe_set), renderer)
        finally:
            renderer.close()

    # The verdict
    def measure(self, renderer, references: dict[str, bytes]) -> tuple[dict, dict[str, bytes]]:
        """(the calibration record of the loaded variant, its probe PNGs): each probe rendered and compared
        with its reference."""
        from worker.engine import quality

        t0 = time.monotonic()
        pngs = quality.render_probes(renderer, self.probe_set)
        measured = [{"id": p.id, **quality.compare(pngs[p.id], references[p.id])} for p in self.probe_set.probes]
        record = {"revision": self.revision, "probe_set": self.probe_set.key, "profile": renderer.loading_profile,
                  "policy": renderer.policy, "arch": self.arch, "torch": self.torch, "gpu": self.boot.gpu,
                  "worker": self.worker_name, "calibrated_at": time.time(), "reference": self.reference_label(),
                  "render_s": round(time.monotonic() - t0, 2), "measured": measured}
        return record, pngs

    def calibrate(self, renderer, use_cache: bool = True) -> tuple[dict, bool]:
        """(the verdict on the loaded variant, whether it came from the cache), rendering and storing a new
        calibration unless a cached one is found (or `use_cache` is off). A lossless renderer with no
        references makes them first. Raises QualityFailed (no safer variant worth trying) when a lossy one
        has none."""
        record = self.cached(renderer.loading_profile, renderer.policy) if use_cache else None
        hit = record is not None
        if record is None:
            references = self.references()
            if references is None and not renderer.lossy:
                from worker.engine import quality

                references = quality.render_probes(renderer, self.probe_set)
                self.store_references(references, renderer)
            if references is None:
                reason = (f"no calibration references for model revision {self.revision} ({self.probe_set.key}): "
                          "run `zfarm calibrate --reference` on a worker that can run a lossless profile, or set "
                          "ZFARM_SKIP_CALIBRATION=1 to serve lossy profiles unverified")
                raise QualityFailed(reason, quality_block(FAILED, renderer.policy, reason=reason), try_safer=False)
            record, pngs = self.measure(renderer, references)
            self.remember(record, pngs)
        result = calibration.judge(record["measured"], self.thresholds)
        self.last_result = {**result, "profile": record["profile"], "policy": record["policy"],
                            "reference": record["reference"], "revision": self.revision, "arch": self.arch,
                            "torch": self.torch, "calibrated_at": record["calibrated_at"], "cached": hit}
        return result, hit

    def judge(self, renderer) -> dict:
        """The renderer's judge (`DiffusionRenderer.load`): the quality block of the loaded variant, or
        QualityFailed."""
        variant = f"{renderer.loading_profile} (policy {renderer.policy})"
        if self.settings.skip_calibration:
            log.warning("quality gate skipped for %s: ZFARM_SKIP_CALIBRATION is set", variant)
            return quality_block(SKIPPED, renderer.policy,
                                 reason="ZFARM_SKIP_CALIBRATION is set: images were not compared with references")
        if not renderer.lossy:
            return quality_block(LOSSLESS, renderer.policy,
                                 reason="lossless: bf16 (or float32) throughout, not judged")
        result, hit = self.calibrate(renderer)
        block = quality_block(PASSED if result["passed"] else FAILED, renderer.policy, result,
                              reference=self.last_result["reference"], calibrated_at=self.last_result["calibrated_at"],
                              cached=hit)
        log.info("quality gate %s for %s%s: PSNR mean %s dB (worst %s), SSIM mean %s (worst %s)",
                 block["status"], variant, " (cached)" if hit else "", result["psnr_db_mean"], result["psnr_db_min"],
                 result["ssim_mean"], result["ssim_min"])
        if not result["passed"]:
            raise QualityFailed(_failure_text(variant, result), block)
        return block

    def known_failure(self, profile: str, policy_name: str) -> tuple[str, dict] | None:
        """(why, quality block) when this farm already judged variant (`profile`, `policy_name`) on this
        arch and torch and it fails under today's thresholds; None when it passed or was never judged. The
        renderer skips such a variant at boot instead of loading and compiling it only to read that verdict."""
        if self.settings.skip_calibration:
            return None
        record = self.cached(profile, policy_name)
        if record is None:
            return None
        result = calibration.judge(record["measured"], self.thresholds)
        if result["passed"]:
            return None
        block = quality_block(FAILED, policy_name, result, reference=record["reference"],
                              calibrated_at=record["calibrated_at"], cached=True)
        why = f"QualityFailed: {_failure_text(f'{profile} (policy {policy_name})', result)} (cached verdict)"
        log.info("quality gate failed for %s (policy %s) (cached): not loaded", profile, policy_name)
        return why, block


def _failure_text(variant: str, result: dict) -> str:
    failing = [p["id"] for p in result["probes"] if not p["passed"]] or ["the probes' means"]
    return (f"{variant} fails the quality gate: {', '.join(failing)} below the thresholds (PSNR mean "
            f"{result['psnr_db_mean']} dB, worst {result['psnr_db_min']}; SSIM mean {result['ssim_mean']}, "
            f"worst {result['ssim_min']})")
