"""How a zfarm worker boots: which of its modules Celery calls, and when.

- parent, before the pool forks (`celeryd_init`): `worker.startup` reads the card, chooses the
  profile, finds the model and names the node;
- each pool process (`worker_process_init`), or the worker itself under the solo and threads pools:
  `worker.loading` loads the renderer in the background;
- the consumer: `worker.registration` registers, heartbeats and adds the job queues once the model is
  loaded; `worker.housekeeping` sweeps dead workers' jobs and delivers webhooks;
- when ready (`worker_ready`): `worker.draining` makes SIGTERM a soft shutdown;
- `celery inspect stats` and Flower: `worker.inspect_info`.
"""
from __future__ import annotations

from celery import signals

from worker import draining, loading, startup
from worker.housekeeping import HousekeepingStep
from worker.inspect_info import InfoStep
from worker.registration import RegistryStep


def on_worker_ready(sender=None, **_):
    draining.install_sigterm_draining()
    # The solo and threads pools render in this process and send no worker_process_init.
    if "prefork" not in type(getattr(sender, "pool", None)).__module__ and loading.LOAD_STATE.value == loading.LOADING:
        loading.start_loading()


def install(app) -> None:
    signals.celeryd_init.connect(startup.on_celeryd_init, weak=False)
    signals.worker_process_init.connect(loading.start_loading, weak=False)
    signals.worker_ready.connect(on_worker_ready, weak=False)
    app.steps["consumer"].add(RegistryStep)
    app.steps["consumer"].add(HousekeepingStep)
    app.steps["worker"].add(InfoStep)
