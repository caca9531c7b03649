"""`zfarm calibrate` (also `python -m worker.calibrate`): the quality gate by hand, on this machine's card.

    zfarm calibrate                     # this card's chosen profile: probes against the bf16 references
    zfarm calibrate --profile P [--policy edges]   # another profile, or a safer variant of it
    zfarm calibrate --reference         # render the references with a lossless profile this card runs
    zfarm calibrate --json              # per probe psnr_db, ssim, passed; top-level passed and profile

It measures afresh (never from the cache) and stores what it measured where workers look for it (the
farm's storage and Redis, `worker.calibration`), so running it on one card of a kind spares every worker
of that kind the probes at boot. Exit 0 when the profile passes (or references were stored), 1 when it
fails, 2 on bad usage or a gate that cannot run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import sys

from shared import calibration
from shared.errors import CalibrationError, QualityFailed, UsageError, ZfarmError
from shared.settings import Settings
from worker import config

EXIT_PASSED, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


def parse_args(argv):
    from worker.engine import policy

    ap = argparse.ArgumentParser(prog="zfarm calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--reference", action="store_true",
                    help="render and store the references (bf16 or float32) instead of judging a profile")
    ap.add_argument("--profile", help="the profile to judge (default: the one this card's worker would run)")
    ap.add_argument("--policy", choices=policy.POLICIES, help="judge the profile with this quantisation policy")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--model", help="ZFARM_MODEL")
    ap.add_argument("--vram-gb", type=float, help="play a card of this many GB (ZFARM_VRAM_GB)")
    ap.add_argument("--redis-url", help="ZFARM_REDIS_URL")
    ap.add_argument("--storage-url", help="ZFARM_STORAGE_URL")
    return ap.parse_args(argv)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args) -> tuple[int, dict]:
    from worker.engine import detect, model_source, specs
    from worker.loading import make_renderer

    settings = Settings.from_env(model=args.model, profile=args.profile, vram_gb=args.vram_gb,
                                 redis_url=args.redis_url, storage_url=args.storage_url)
    if settings.simulated:
        raise UsageError("a simulated renderer draws no model's images: unset ZFARM_SIMULATE_S to calibrate")
    config.install(settings)
    table = config.table()
    boot = detect.detect(settings, table)
    settings = settings.replace(model=model_source.resolve_model(settings.model, settings.model_cache_dir))
    config.install(settings)
    from worker.calibration import Gate

    gate = Gate(settings, boot, table, f"calibrate@{socket.gethostname()}")
    if args.reference:
        lossless = gate.lossless_candidates()
        if args.profile:
            if specs.lossy_on(args.profile, boot.device):
                raise UsageError(f"--reference needs a lossless profile; {args.profile} is lossy")
            lossless = [boot.choice]
        if not lossless:
            raise CalibrationError("this card runs no lossless profile that fits it: render the references elsewhere")
        provenance = gate.make_references(make_renderer, lossless)
        return EXIT_PASSED, {"reference": calibration.reference_label(provenance), "revision": gate.revision,
                             "probe_set": gate.probe_set.key, "probes": provenance["probes"],
                             "stored": calibration.references_folder(gate.revision, gate.probe_set), "passed": True,
                             "profile": provenance["profile"]}
    gate.prepare(make_renderer)
    renderer = make_renderer(settings, dataclasses.replace(boot, fallbacks=()))
    renderer.load(policy=args.policy or "")
    try:
        result, _ = gate.calibrate(renderer, use_cache=False)
    except QualityFailed as exc:   # no references to judge by
        return EXIT_FAILED, {"profile": renderer.loading_profile, "policy": renderer.policy, "passed": False,
                             "probes": [], "error": str(exc)}
    finally:
        renderer.close()
    out = {"profile": renderer.loading_profile, "policy": renderer.policy, "lossy": renderer.lossy,
           **{k: v for k, v in gate.last_result.items() if k not in ("profile", "policy")}}
    return (EXIT_PASSED if result["passed"] else EXIT_FAILED), out


def print_text(out: dict) -> None:
    if "stored" in out:
        print(f"references stored under {out['stored']}: {', '.join(out['probes'])}")
        _say(f"rendered with {out['reference']}")
        return
    for probe in out.get("probes", []):
        print(f"{probe['id']:14s} psnr {probe['psnr_db']} dB  ssim {probe['ssim']}  "
              f"{'passed' if probe['passed'] else 'FAILED'}")
    if out.get("error"):
        _say(f"zfarm calibrate: {out['error']}")
        return
    _say(f"{out['profile']} (policy {out['policy']}): {'passed' if out['passed'] else 'FAILED'}; PSNR mean "
         f"{out['psnr_db_mean']} dB, SSIM mean {out['ssim_mean']}; against {out['reference']}")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        code, out = run(args)
    except ZfarmError as exc:
        _say(f"zfarm calibrate: {exc}")
        return EXIT_ERROR
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print_text(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
