"""Host memory of a benchmark run, split by what a smaller host would have to hold.

`ru_maxrss` (the profiles' `host_rss_gib`) counts every resident page, including the file-backed pages
of the checkpoint: diffusers and transformers map the safetensors files and the loaded weights are
views into those mappings. After a profile converts its weights (fp8), those pages hold nothing it
reads again, and under memory pressure the kernel drops them like any page cache. So peak RSS may
overstate the RAM a profile needs. This samples, in a thread, the process's resident anonymous,
file-backed and shared pages (/proc/self/status) and how far the host's used memory
(MemTotal - MemAvailable, /proc/meminfo) rose above where it stood at the start: page-locked (pinned)
memory is used memory whatever the process's own accounting calls it.

Peaks are sampled, so a spike shorter than the interval can be missed; `ru_maxrss` stays the bound.
Each sample reads two small /proc files (well under a millisecond of the GIL every 50 ms), so the timed
calls it runs beside are slowed by a fraction of a percent at most.
"""
from __future__ import annotations

import re
import subprocess
import threading

STATUS_FIELDS = {"anon": "RssAnon", "file": "RssFile", "shmem": "RssShmem"}
INTERVAL_S = 0.05


def _kib_fields(path: str, names) -> dict[str, int]:
    with open(path) as handle:
        text = handle.read()
    return {name: int(re.search(rf"^{name}:\s+(\d+) kB", text, re.M).group(1)) for name in names}


def process_kib() -> dict[str, int]:
    """This process's resident pages now, by kind (KiB)."""
    found = _kib_fields("/proc/self/status", STATUS_FIELDS.values())
    return {kind: found[field] for kind, field in STATUS_FIELDS.items()}


def host_used_kib() -> int:
    """The host's memory in use now (KiB): what is not available to a new allocation without swapping."""
    found = _kib_fields("/proc/meminfo", ("MemTotal", "MemAvailable"))
    return found["MemTotal"] - found["MemAvailable"]


class HostMemoryPeaks:
    """Peaks of process_kib() and of the host's used memory above its level at construction."""

    def __init__(self, interval_s: float = INTERVAL_S):
        self.interval_s = interval_s
        self._host_start_kib = host_used_kib()
        self._peak_kib = dict.fromkeys(STATUS_FIELDS, 0)
        self._host_rise_kib = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        for kind, kib in process_kib().items():
            self._peak_kib[kind] = max(self._peak_kib[kind], kib)
        self._host_rise_kib = max(self._host_rise_kib, host_used_kib() - self._host_start_kib)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> "HostMemoryPeaks":
        self.sample()
        self._thread = threading.Thread(target=self._run, name="host-memory-peaks", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def record(self) -> dict[str, float]:
        """The peaks so far in GiB, under the run record's names."""
        self.sample()
        gib = lambda kib: round(kib / 2**20, 2)  # noqa: E731
        return {"host_anon_peak_gib": gib(self._peak_kib["anon"]), "host_file_peak_gib": gib(self._peak_kib["file"]),
                "host_shmem_peak_gib": gib(self._peak_kib["shmem"]), "host_used_rise_gib": gib(self._host_rise_kib)}


def drop_page_cache() -> tuple[bool, str]:
    """`sync; echo 3 > /proc/sys/vm/drop_caches` (root only): (worked, why not)."""
    proc = subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], capture_output=True, text=True)
    return proc.returncode == 0, " ".join(proc.stderr.split())[:200]
