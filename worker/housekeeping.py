"""Fleet chores a worker parent runs on its heartbeat: hand back the jobs of dead workers, queue
again jobs whose message was lost, and deliver finished-batch webhooks. One lock in Redis lets one
worker of the fleet do them each period (`worker.sweeper`)."""
from __future__ import annotations

import logging

from shared import keys, routing
from worker import config
from worker.registration import RegistryStep, TimedStep
from worker.sweeper import requeue_lost_jobs, sweep_dead_claims
from worker.webhooks import deliver_finished

log = logging.getLogger(__name__)


class HousekeepingStep(TimedStep):
    """Consumer step: the dead-worker sweep, the lost-message scan and webhook delivery, on timers."""

    requires = (RegistryStep,)

    def start(self, c):
        settings = config.settings()
        self.connect(settings)
        self.timers = [c.timer.call_repeatedly(settings.heartbeat_s, self._chores, (settings,), priority=5)]

    def _chores(self, settings):
        # One worker of the fleet does them each period: whoever takes the lock first. Every other
        # worker spends one SET on it (each worker tried three locks or pops a heartbeat before).
        if not self.client.set(keys.SWEEP_LOCK, b"1", nx=True, px=int(settings.heartbeat_s * 2 * 1000)):
            return
        self._sweep(settings)
        self._webhooks(settings)

    def _sweep(self, settings):
        table = config.table()
        # A live worker claims a job within moments of taking its message; one registry TTL is
        # far longer than that, and no longer than noticing a dead worker takes anyway.
        restored = sweep_dead_claims(self.client, None, min_age_s=settings.registry_ttl_s)
        if restored:
            log.warning("handed %d job(s) of dead workers back to their queues", restored)
        # A message is recorded within milliseconds of its pop; two registry TTLs without one
        # means the pop's worker, or Redis, died in between.
        requeue_lost_jobs(self.client, routing.all_job_queues(table, settings.lanes),
                          routing.time_limit_for(table, settings.job_margin),
                          confirm_s=settings.registry_ttl_s * 2, lock_s=None)

    def _webhooks(self, settings):
        deliver_finished(self.client, settings.webhook_timeout_s, settings.webhook_allowed_networks)

    def shutdown(self, c):
        self.stop(c)
