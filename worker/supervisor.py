"""`zfarm worker --gpus all|0,1|0:80,1:12`: one worker process per GPU on a multi-GPU box.

Each child is a whole `python -m worker` pinned to its card with CUDA_VISIBLE_DEVICES, so it
detects its own class, chooses its own profile and registers under its own name. A child that
crashes is restarted with exponential backoff without touching the others; SIGTERM or SIGINT is
passed to every child and the supervisor waits for them all (each finishes or hands back its job
within the grace period), then exits 0.

Runs no CUDA and imports no torch: it reads the cards through NVML only.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from shared import profiles
from shared.errors import GpuSpecError
from worker.engine import detect

log = logging.getLogger("zfarm.supervisor")

EX_CONFIG = 78
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 60.0
# A child that stayed up this long is healthy again: its next crash starts the backoff afresh.
HEALTHY_AFTER_S = 60.0
POLL_S = 0.2




@dataclass
class Slot:
    gpu_index: int
    vram_gb: float | None          # per-card --vram-gb override, or None to detect
    name: str = ""
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_FIRST_S
    restart_at: float | None = None
    done: bool = False
    exit_codes: list = field(default_factory=list)


def parse_gpus(spec: str, gpus: list[detect.GpuInfo]) -> list[Slot]:
    """'all', '0,1' or '0:80,1:12' (card index, optionally the class it should play)."""
    spec = spec.strip()
    if spec == "all":
        if not gpus:
            raise GpuSpecError("--gpus all: NVML sees no GPU on this machine")
        return [Slot(i, None) for i in range(len(gpus))]
    slots, seen = [], set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        index_text, _, vram_text = part.partition(":")
        if not index_text.isdigit():
            raise GpuSpecError(f"--gpus {spec!r}: {part!r} is not a card index (e.g. 0 or 0:12)")
        index = int(index_text)
        if index >= len(gpus):
            raise GpuSpecError(f"--gpus {spec!r}: card {index} does not exist (NVML sees {len(gpus)})")
        if index in seen:
            raise GpuSpecError(f"--gpus {spec!r}: card {index} is named twice")
        seen.add(index)
        try:
            vram_gb = float(vram_text) if vram_text else None
        except ValueError:
            raise GpuSpecError(f"--gpus {spec!r}: {vram_text!r} is not a number of GB") from None
        slots.append(Slot(index, vram_gb))
    if not slots:
        raise GpuSpecError(f"--gpus {spec!r} names no card")
    return slots


def slot_name(slot: Slot, gpu: detect.GpuInfo, host: str) -> str:
    vram_class = (profiles.class_for_override(slot.vram_gb) if slot.vram_gb
                  else profiles.class_for_vram(gpu.total_gib))
    label = profiles.class_label(vram_class) if vram_class is not None else "small"
    return f"zimage-{label}-gpu{slot.gpu_index}@{host}"


def child_args(slot: Slot, worker_args: list[str], metrics_port: int) -> list[str]:
    """The `python -m worker` arguments of one card's worker: the supervisor's own, then its name, the
    class it plays, and its metrics port (base port + card index: one endpoint per card)."""
    args = [*worker_args, "--name", slot.name]
    if slot.vram_gb:
        args += ["--vram-gb", str(slot.vram_gb)]
    if metrics_port:
        args += ["--metrics-port", str(metrics_port + slot.gpu_index)]
    return args


class Supervisor:
    def __init__(self, slots: list[Slot], worker_args: list[str], metrics_port: int = 0, env: dict | None = None):
        self.slots = slots
        self.worker_args = worker_args
        self.metrics_port = metrics_port
        self.env = dict(os.environ if env is None else env)
        self.stopping = False

    def _spawn(self, slot: Slot) -> None:
        # CUDA reads nothing else: each child sees only its own card.
        env = {**self.env, "CUDA_VISIBLE_DEVICES": str(slot.gpu_index)}
        slot.proc = subprocess.Popen([sys.executable, "-m", "worker",
                                      *child_args(slot, self.worker_args, self.metrics_port)], env=env)
        slot.started_at = time.monotonic()
        slot.restart_at = None
        log.info("started %s (pid %d) on GPU %d", slot.name, slot.proc.pid, slot.gpu_index)

    def _on_exit(self, slot: Slot, code: int) -> None:
        slot.exit_codes.append(code)
        if self.stopping or code == 0:
            slot.done = True
            return
        if code == EX_CONFIG:
            log.error("%s cannot start as configured (exit %d): not restarting it", slot.name, code)
            slot.done = True
            return
        if time.monotonic() - slot.started_at > HEALTHY_AFTER_S:
            slot.backoff_s = BACKOFF_FIRST_S
        slot.restart_at = time.monotonic() + slot.backoff_s
        log.warning("%s exited with %d: restarting in %.0f s", slot.name, code, slot.backoff_s)
        slot.backoff_s = min(slot.backoff_s * 2, BACKOFF_MAX_S)

    def stop(self, *_):
        if not self.stopping:
            log.info("stopping %d workers", len(self.slots))
        self.stopping = True
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for slot in self.slots:
            self._spawn(slot)
        while not all(slot.done for slot in self.slots):
            for slot in self.slots:
                if slot.done:
                    continue
                if slot.proc is not None and slot.restart_at is None:
                    code = slot.proc.poll()
                    if code is not None:
                        self._on_exit(slot, code)
                elif slot.restart_at is not None:
                    if self.stopping:
                        slot.done = True
                    elif time.monotonic() >= slot.restart_at:
                        slot.restarts += 1
                        self._spawn(slot)
            time.sleep(POLL_S)
        return 0 if self.stopping or all(c == 0 for s in self.slots for c in s.exit_codes[-1:]) else 1


def main(gpus_spec: str, worker_args: list[str], settings) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/supervisor] %(message)s")
    gpus = detect.nvml_gpus()
    try:
        slots = parse_gpus(gpus_spec, gpus)
    except GpuSpecError as exc:
        print(f"zfarm worker: {exc}", file=sys.stderr)
        return 2
    host = socket.gethostname()
    for slot in slots:
        slot.name = slot_name(slot, gpus[slot.gpu_index], host)
    return Supervisor(slots, worker_args, settings.metrics_port).run()
