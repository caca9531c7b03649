"""What `celery inspect stats` and Flower's worker page show of a zfarm worker: its card, class,
profile and speed (a worker bootstep's `info()`)."""
from __future__ import annotations

from celery import bootsteps

from shared import registry
from shared.redis_conn import connect
from worker import config
from worker.state import STATE

# Stats must answer quickly even while Redis is away.
STATS_REDIS_RETRY_S = 2.0


class InfoStep(bootsteps.StartStopStep):
    """Worker step whose info() shows the card, class and profile in `inspect stats` and Flower."""

    def info(self, worker):
        boot = STATE.boot
        if boot is None:
            return {}
        info = {"gpu": boot.gpu, "vram_gb": boot.vram_gib, "vram_class": boot.vram_class,
                "profile": boot.choice.profile, "max_pixels": boot.choice.max_pixels,
                "s_per_image_measured": boot.choice.s_per_image, "model": STATE.model_path,
                "ready": STATE.ready, "queues": len(STATE.queues), "arch": boot.arch,
                "self_test": STATE.self_test, "policy": STATE.policy, "quality": STATE.quality,
                **{k: v for k, v in STATE.step_down.items() if k != "boot_attempts"}}
        try:
            client = connect(config.settings().redis_url, retry_s=STATS_REDIS_RETRY_S,
                             master_name=config.settings().redis_master_name)
            me = {w["name"]: w for w in registry.live_workers(client)}.get(STATE.name, {})
            info.update({"s_per_image": me.get("s_per_image"), "jobs_done": me.get("jobs_done"),
                         "jobs_failed": me.get("jobs_failed"), "profile": me.get("profile", boot.choice.profile)})
        except Exception as exc:  # stats must answer even while Redis is away; say why speed is missing
            info["s_per_image"] = f"unavailable: {type(exc).__name__}"
        return {"zfarm": info}
