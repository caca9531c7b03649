"""Run a benchmark process as if on a host with less RAM: in a cgroup v2 group whose `memory.max` is the
limit and `memory.swap.max` is 0 (Linux, root, the memory controller available).

Under the limit the kernel reclaims the group's page cache (the mapped checkpoint's file pages) before
it kills anything; anonymous and page-locked (pinned) memory it cannot reclaim. A run that finishes
under a limit of L GiB proves that the profile fits a host of L + `HOST_RESERVE_GIB` GiB, which the
chooser leaves to the OS and the worker, where peak RSS, which counts the file pages, says far more.

Page cache is charged to the group that reads it first, so `bench/profiles.py` drops the host's page
cache before a limited run: weights already cached by an earlier run would otherwise be mapped
without being charged, and the limit would not bind.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from shared.errors import ZfarmError

CGROUP_ROOT = Path("/sys/fs/cgroup")
GIB = 2 ** 30


class MemoryLimitError(ZfarmError, RuntimeError):
    """Raised when the host cannot limit a process's memory this way (no cgroup v2 memory controller,
    not root)."""


class MemoryLimit:
    """A cgroup v2 group with a memory limit, for the processes that `wrap` starts; removed on exit.
    `remove` takes the group's folder away (os.rmdir on the cgroup file system)."""

    def __init__(self, limit_gib: float, root: Path = CGROUP_ROOT, remove=os.rmdir):
        self.limit_gib = limit_gib
        self.root = Path(root)
        self.path = self.root / f"zfarm-bench-{uuid.uuid4().hex[:8]}"
        self._remove = remove

    def __enter__(self) -> "MemoryLimit":
        controllers = self.root / "cgroup.controllers"
        if not controllers.exists():
            raise MemoryLimitError(f"no cgroup v2 hierarchy at {self.root} (cgroup.controllers missing)")
        if "memory" not in controllers.read_text().split():
            raise MemoryLimitError(f"the memory controller is not available at {self.root}: "
                                   f"{controllers.read_text().strip() or 'no controllers'}")
        try:
            subtree = self.root / "cgroup.subtree_control"
            if "memory" not in subtree.read_text().split():
                subtree.write_text("+memory")
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(int(self.limit_gib * GIB)))
            swap = self.path / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
        except OSError as exc:
            raise MemoryLimitError(f"cannot set up a memory limit under {self.root}: {exc}") from exc
        return self

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd` started inside the group: the shell moves itself in, then becomes `cmd`."""
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *cmd]

    def report(self) -> dict:
        """The group's peak charge and its memory events: `max` counts the times it reached the limit
        (and reclaimed), `oom_kill` the processes the kernel killed for it."""
        out: dict = {"host_memory_limit_gib": self.limit_gib}
        peak = self.path / "memory.peak"
        if peak.exists():
            out["host_memory_limit_peak_gib"] = round(int(peak.read_text()) / GIB, 2)
        events = self.path / "memory.events"
        if events.exists():
            out["host_memory_limit_events"] = {name: int(count) for name, count in
                                               (line.split() for line in events.read_text().splitlines() if line)}
        return out

    def __exit__(self, *exc_info) -> None:
        self._remove(self.path)
