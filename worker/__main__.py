"""`zfarm worker` (also `python -m worker`): one Celery render worker in the foreground.

Flags override the ZFARM_* settings of the environment; the result is installed as this process's
settings (`worker.config`) before the Celery app reads its configuration, so
`celery -A worker.app worker` with the same environment variables behaves the same.
"""
from __future__ import annotations

import argparse
import os
import sys

from shared.errors import SettingsError
from shared.settings import Settings
from worker import config


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="zfarm worker", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Hugging Face id, modelscope:<id> or local folder (ZFARM_MODEL)")
    ap.add_argument("--name", help="worker name (ZFARM_WORKER_NAME); default zimage-<class>@<host>")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="rendering processes; each loads its own copy of the model (default 1)")
    ap.add_argument("--vram-gb", type=float, help="play a card of this many GB (ZFARM_VRAM_GB)")
    ap.add_argument("--ram-gb", type=float, help="host RAM to plan for (ZFARM_RAM_GB)")
    ap.add_argument("--profile", help="force a memory/offload profile (ZFARM_PROFILE)")
    ap.add_argument("--allow-lossy", action="store_const", const=True, default=None,
                    help="let the chooser pick profiles that change images visibly (ZFARM_ALLOW_LOSSY)")
    ap.add_argument("--simulate", type=float, metavar="SECONDS",
                    help="simulated renderer: SECONDS per 1024x1024 8-step image (load tests only)")
    ap.add_argument("--redis-url", help="ZFARM_REDIS_URL")
    ap.add_argument("--storage-url", help="ZFARM_STORAGE_URL")
    ap.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (ZFARM_METRICS_PORT)")
    ap.add_argument("--gpus", metavar="SPEC",
                    help="one worker per GPU: 'all', '0,1', or '0:80,1:12' (card:GB class to play)")
    ap.add_argument("--loglevel", default="INFO")
    return ap.parse_args(argv)


# Flag -> the Settings field it overrides.
FIELD_FOR_FLAG = {"model": "model", "name": "worker_name", "vram_gb": "vram_gb", "ram_gb": "ram_gb",
                  "profile": "profile", "allow_lossy": "allow_lossy", "simulate": "simulate_s",
                  "redis_url": "redis_url", "storage_url": "storage_url", "metrics_port": "metrics_port"}


def settings_from(args) -> Settings:
    """The environment's settings with this command line's flags on top."""
    return Settings.from_env(**{field: getattr(args, flag) for flag, field in FIELD_FOR_FLAG.items()})


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


# Celery's worker-heartbeat event (a PUBLISH to Flower's channel, sent whether Flower runs or not):
# every 10 s instead of Celery's 2 s. Flower counts a worker offline after two missed ones.
EVENT_HEARTBEAT_S = 10.0


def main(argv=None) -> int:
    raw_argv = sys.argv[1:] if argv is None else argv
    args = parse_args(raw_argv)
    try:
        settings = settings_from(args)
    except SettingsError as exc:
        print(f"zfarm worker: {exc}", file=sys.stderr)
        return 2
    if args.gpus:
        if args.name or args.vram_gb:
            print("zfarm worker: with --gpus, names and --vram-gb are per card (e.g. --gpus 0:80,1:12)",
                  file=sys.stderr)
            return 2
        from worker import supervisor

        return supervisor.main(args.gpus, _without_gpus(raw_argv), settings)
    config.install(settings)
    # SIGTERM runs Celery's soft shutdown (finish the job within the grace period or hand it back),
    # and pool processes ignore a SIGTERM sent to the whole process group. billiard reads this
    # variable, and nothing else, when it is imported.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    from celery import signals

    from worker.app import app

    signals.worker_shutdown.connect(_record_exit_code, weak=False)

    argv_celery = ["worker", f"--loglevel={args.loglevel}", f"--concurrency={args.concurrency}",
                   "--without-mingle", "--without-gossip", f"--heartbeat-interval={EVENT_HEARTBEAT_S:g}"]
    app.worker_main(argv_celery)
    # The code the worker stopped with (78 when Redis refused its password); a model that never loaded
    # is a configuration error (78) too, which supervisors (zfarm worker --gpus, systemd's
    # RestartPreventExitStatus) do not restart.
    from worker.startup import EX_CONFIG
    from worker.state import STATE

    return _worker_exit_code() or (EX_CONFIG if STATE.failed else 0)


_exit_codes: list = []


def _record_exit_code(sender=None, **_):
    _exit_codes.append(getattr(sender, "exitcode", None))


def _worker_exit_code() -> int:
    """The code the worker stopped with (78 when Redis refused its password, say). `celery worker`
    exits with it, but `app.worker_main` drops it, so it is taken from the worker_shutdown signal."""
    return next((code for code in reversed(_exit_codes) if isinstance(code, int)), 0)


if __name__ == "__main__":
    sys.exit(main())
