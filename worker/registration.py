"""The worker's registry entry: register, heartbeat, and the readiness gate.

A worker registers as `loading` and consumes only the holding queue. Once the rendering process
reports the model loaded and through its quality gate (`worker.loading`, `worker.calibration`), it turns
`ready`, records the policy and quality block of the variant that passed, and adds its job queues; if
the load failed, it records why and stops (exit 78). It deregisters on a clean shutdown, after handing back
any message it popped but never recorded (`worker.draining`).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import redis
from celery import bootsteps
from celery.worker import state as worker_state

from shared import cards, keys, profiles, registry, routing
from shared.redis_conn import connect
from worker import config, draining, loading, metrics
from worker.startup import EX_CONFIG
from worker.state import STATE, versions

log = logging.getLogger(__name__)

# How often the parent looks whether the rendering process has loaded the model: a shared-memory
# read, cheap, and the first job waits on it.
READY_POLL_S = 0.05
# How long a worker whose model never loaded stays in the registry, as "failed" with its reason.
FAILED_ENTRY_TTL_S = 600.0


def registration(settings) -> dict:
    """This worker's registry entry."""
    boot = STATE.boot
    return {
        "name": STATE.name, "instance": STATE.instance, "host": boot.host, "pid": os.getpid(),
        "gpu": boot.gpu, "vram_gb": boot.vram_gib, "vram_class": boot.vram_class,
        "cap_gib": boot.cap_gib if boot.cap_gib is not None else "", "profile": boot.choice.profile,
        "max_pixels": boot.choice.max_pixels,
        "s_per_image_measured": boot.choice.s_per_image if boot.choice.s_per_image is not None else "",
        "host_ram_gb": boot.host_ram_gib, "model": settings.model,
        "renderer": "simulated" if settings.simulated else "diffusers",
        "simulate_s": settings.simulate_s if settings.simulated else "",
        "versions": versions(), "started_at": STATE.started_at,
        "state": "ready" if STATE.ready else "loading",
        "tiers": sorted({routing.parse_queue(q)[1] for q in STATE.queues}),
        # Producers never queue into a lane beyond the fewest any live worker consumes.
        "lanes": settings.lanes,
        "arch": boot.arch, "capabilities": sorted(boot.capabilities.features) if boot.capabilities else [],
        "emulated_on": boot.capabilities.emulated_on if boot.capabilities else "",
        "self_test": STATE.self_test, "policy": STATE.policy, "quality": STATE.quality, **STATE.step_down,
        # This card's speed on its profile as modelled from the measuring card's: what scale-advice counts
        # on until the worker's own average (s_per_image) exists.
        "s_per_image_expected": _expected_s_per_image(boot),
    }


def _expected_s_per_image(boot):
    card = cards.find(boot.gpu)
    expected = cards.expected_s_per_image(profiles.row_for(config.table(), boot.choice), card) if card else None
    return expected["s_per_image"] if expected else ""


def _adopt_step_down(report: dict) -> None:
    """The rendering process stepped down from the chosen profile at boot: take the profile that passed
    as this worker's (its largest image decides the queues it serves), remember from which and why, and
    count it."""
    boot = STATE.boot
    # A safer variant of the chosen profile (more layers in bf16) keeps its choice; another profile is a fallback.
    passed = boot.choice if report["profile"] == boot.choice.profile else next(
        (c for c in boot.fallbacks if c.profile == report["profile"]), None)
    if passed is None:
        log.error("the rendering process reports profile %s, which is not among %s's fallbacks",
                  report["profile"], boot.choice.profile)
        return
    STATE.boot = dataclasses.replace(boot, choice=passed)
    STATE.queues = routing.worker_queues(passed.max_pixels, config.table(), config.settings().lanes)
    STATE.step_down = {"downgraded_from": report["downgraded_from"], "downgrade_reason": report["reason"],
                       "boot_attempts": report.get("attempts", [])}
    kind = report["reason"].split(":", 1)[0]
    to = report.get("downgraded_to") or passed.profile   # "profile:policy" for a safer variant
    metrics.count_profile_stepdown(boot.vram_class, report["downgraded_from"], to, kind)
    log.warning("zfarm worker %s runs %s: %s failed its boot self-test (%s)", STATE.name, to,
                report["downgraded_from"], report["reason"])


class TimedStep(bootsteps.StartStopStep):
    """A consumer step that runs on Celery's timer with a Redis client of its own: `start` opens the
    client, `stop` cancels the timers it started."""

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        self.timers = []
        self.client = None

    def connect(self, settings):
        self.client = connect(settings.redis_url, master_name=settings.redis_master_name)

    def stop(self, c):
        for timer in self.timers:
            timer.cancel()
        self.timers = []


class RegistryStep(TimedStep):
    """Consumer step: registration, heartbeat and the readiness gate."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c):
        settings = config.settings()
        self.connect(settings)
        registry.register(self.client, registration(settings), settings.registry_ttl_s)
        if STATE.ready:
            self._consume(c)
        self.timers = [c.timer.call_repeatedly(settings.heartbeat_s, self._heartbeat, (settings,), priority=10)]
        if not STATE.ready:
            self.timers.append(c.timer.call_repeatedly(READY_POLL_S, self._await_ready, (c,), priority=10))

    def _await_ready(self, c):
        if STATE.ready:
            return
        outcome, error, load_s, report = loading.load_outcome()
        if outcome == loading.READY:
            STATE.self_test = report.get("self_test", {})
            STATE.policy, STATE.quality = report.get("policy", ""), report.get("quality", {})
            if report.get("downgraded_from"):
                _adopt_step_down(report)
            STATE.ready = True
            settings = config.settings()
            # Written whole: a step-down changed the profile, the largest image and the tiers served.
            registry.register(self.client, {**registration(settings), "load_s": f"{load_s:.2f}"},
                              settings.registry_ttl_s)
            self._consume(c)
        elif outcome == loading.FAILED:
            STATE.failed = error
            self.client.hset(keys.worker(STATE.name), mapping={"state": "failed", "error": error})
            log.critical("zfarm worker %s stops: the model did not load (%s)", STATE.name, error)
            worker_state.should_stop = EX_CONFIG

    def _consume(self, c):
        for queue in STATE.queues:
            c.add_task_queue(queue)
        # The BRPOP in flight waits on the holding queue alone until its timeout; end it so the job
        # queues are polled now.
        woken = c.task_consumer.channel.wake()  # worker.transport's Channel (app.broker_transport)
        log.info("zfarm worker %s consumes %d queues%s", STATE.name, len(STATE.queues),
                 " (woke the BRPOP in flight)" if woken else "")

    def _heartbeat(self, settings):
        from worker.sweeper import held_jobs

        # The jobs held now: the sweep hands back a job a live worker claims but no longer holds.
        if not registry.heartbeat(self.client, STATE.name, settings.registry_ttl_s, jobs=held_jobs()):
            log.warning("registry entry of %s had expired; registering again", STATE.name)
            registry.register(self.client, registration(settings), settings.registry_ttl_s)

    def shutdown(self, c):
        self.stop(c)
        if self.client is None:
            return
        draining.hand_back_popped(self.client)
        if STATE.failed:
            # Left in the registry for a while, state "failed" with the reason: `zfarm workers` and Flower
            # show why this card does not serve, rather than it vanishing.
            self.client.pexpire(keys.worker(STATE.name), int(FAILED_ENTRY_TTL_S * 1000))
            log.info("zfarm worker %s stays listed as failed for %.0f s", STATE.name, FAILED_ENTRY_TTL_S)
            return
        try:
            registry.deregister(self.client, STATE.name)
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # refused credentials included
            log.warning("zfarm worker %s could not deregister (%s); its entry expires with its TTL", STATE.name, exc)
            return
        log.info("zfarm worker %s deregistered", STATE.name)
