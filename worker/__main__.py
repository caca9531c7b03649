"""`zfarm worker` (also `python -m worker`): one Celery render worker in the foreground.

Flags become ZFARM_* settings before the Celery app is imported, so `celery -A worker.app worker`
with the same environment variables behaves the same.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="zfarm worker", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Hugging Face id, modelscope:<id> or local folder (ZFARM_MODEL)")
    ap.add_argument("--name", help="worker name (ZFARM_WORKER_NAME); default zimage-<class>@<host>")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="rendering processes; each loads its own copy of the model (default 1)")
    ap.add_argument("--vram-gb", type=float, help="play a card of this many GB (ZFARM_VRAM_GB)")
    ap.add_argument("--ram-gb", type=float, help="host RAM to plan for (ZFARM_RAM_GB)")
    ap.add_argument("--profile", help="force a memory/offload profile (ZFARM_PROFILE)")
    ap.add_argument("--allow-lossy", action="store_const", const="1", default=None,
                    help="let the chooser pick profiles that change images visibly (ZFARM_ALLOW_LOSSY)")
    ap.add_argument("--simulate", type=float, metavar="SECONDS",
                    help="simulated renderer: SECONDS per 1024x1024 8-step image (load tests only)")
    ap.add_argument("--redis-url", help="ZFARM_REDIS_URL")
    ap.add_argument("--storage-url", help="ZFARM_STORAGE_URL")
    ap.add_argument("--gpus", metavar="SPEC",
                    help="one worker per GPU: 'all', '0,1', or '0:80,1:12' (card:GB class to play)")
    ap.add_argument("--loglevel", default="INFO")
    return ap.parse_args(argv)


ENV_FOR_FLAG = {"model": "ZFARM_MODEL", "name": "ZFARM_WORKER_NAME", "vram_gb": "ZFARM_VRAM_GB",
                "ram_gb": "ZFARM_RAM_GB", "profile": "ZFARM_PROFILE", "allow_lossy": "ZFARM_ALLOW_LOSSY",
                "simulate": "ZFARM_SIMULATE_S",
                "redis_url": "ZFARM_REDIS_URL", "storage_url": "ZFARM_STORAGE_URL"}


def _without_gpus(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out


def main(argv=None) -> int:
    raw_argv = sys.argv[1:] if argv is None else argv
    args = parse_args(raw_argv)
    if args.gpus:
        if args.name or args.vram_gb:
            print("zfarm worker: with --gpus, names and --vram-gb are per card (e.g. --gpus 0:80,1:12)",
                  file=sys.stderr)
            return 2
        from worker import supervisor

        return supervisor.main(args.gpus, _without_gpus(raw_argv))
    for attr, env in ENV_FOR_FLAG.items():
        value = getattr(args, attr)
        if value is not None:
            os.environ[env] = str(value)
    # SIGTERM runs Celery's soft shutdown (finish the job within the grace period or hand it back),
    # and pool processes ignore a SIGTERM sent to the whole process group. Read at billiard import.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    from celery import signals

    from worker.app import app

    signals.worker_shutdown.connect(_record_exit_code, weak=False)

    argv_celery = ["worker", f"--loglevel={args.loglevel}", f"--concurrency={args.concurrency}",
                   "--without-mingle", "--without-gossip"]
    app.worker_main(argv_celery)
    return _worker_exit_code()


_exit_codes: list = []


def _record_exit_code(sender=None, **_):
    _exit_codes.append(getattr(sender, "exitcode", None))


def _worker_exit_code() -> int:
    """The code the worker stopped with (78 when Redis refused its password, say). `celery worker`
    exits with it, but `app.worker_main` drops it, so it is taken from the worker_shutdown signal."""
    return next((code for code in reversed(_exit_codes) if isinstance(code, int)), 0)


if __name__ == "__main__":
    sys.exit(main())
