"""What a worker process knows about itself: set in the parent at boot, inherited by the pool."""
from __future__ import annotations

import functools
import importlib.metadata
import platform
from dataclasses import dataclass, field

from worker.engine.detect import BootInfo

# Packages whose versions say what rendered an image, for the registration and every sidecar.
VERSIONED_PACKAGES = ("zfarm", "celery", "kombu", "redis", "torch", "diffusers", "transformers", "accelerate")


@dataclass
class WorkerState:
    boot: BootInfo | None = None
    name: str = ""
    instance: str = ""
    model_path: str = ""
    queues: list = field(default_factory=list)
    started_at: float = 0.0
    ready: bool = False
    self_test: dict = field(default_factory=dict)    # the boot self-test of the profile that passed
    # When the chosen profile failed its self-test: downgraded_from, downgrade_reason, boot_attempts.
    step_down: dict = field(default_factory=dict)
    failed: str = ""            # why the model did not load, when it did not: the worker then stops
    policy: str = ""            # the quantisation policy of the variant that passed (worker.engine.policy)
    quality: dict = field(default_factory=dict)   # its quality block (shared.calibration.quality_block)

    @property
    def claim(self) -> str:
        """How the ledger names this worker instance in a job's running entry."""
        return f"{self.name}/{self.instance}"


STATE = WorkerState()


def versions() -> dict:
    """Installed versions of what renders and queues (a fresh copy each call)."""
    return dict(_versions())


@functools.cache
def _versions() -> dict:
    # Cached: reading package metadata costs milliseconds, and it is asked for every job.
    out = {"python": platform.python_version()}
    for dist in VERSIONED_PACKAGES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
