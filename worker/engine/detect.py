"""What this worker runs on: GPU, VRAM class, host RAM, and the profile it will use.

Runs in the Celery parent before the pool forks, so it must not create a CUDA context (a CUDA
context in the parent breaks the forked children): NVML reads the card without one.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass

from shared import profiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    total_gib: float
    compute_capability: str


@dataclass(frozen=True)
class BootInfo:
    host: str
    device: str                 # "cuda" or "cpu"
    gpu: str                    # card name, or "cpu"
    vram_gib: float             # detected total, or the override
    vram_class: object          # 8/12/16/24/48/80 or "cpu"
    cap_gib: float | None       # allocator cap applied in the rendering process, if any
    compute_capability: str
    host_ram_gib: float
    choice: profiles.Choice

    def to_dict(self) -> dict:
        out = asdict(self)
        out["choice"] = self.choice.to_dict()
        return out


def nvml_gpus() -> list[GpuInfo]:
    """Cards visible to this process (CUDA_VISIBLE_DEVICES respected), read through NVML."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("no NVIDIA driver here (%s): rendering on the CPU", exc)
        return []
    try:
        indices = _visible_indices(pynvml.nvmlDeviceGetCount())
        gpus = []
        for i in indices:
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(GpuInfo(name=name, total_gib=round(total, 2), compute_capability=f"{major}.{minor}"))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _visible_indices(count: int) -> list[int]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() == "":
        return list(range(count)) if visible is None else []
    out = []
    for part in visible.split(","):
        part = part.strip()
        if part.isdigit() and int(part) < count:
            out.append(int(part))
    return out


def host_ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def detect(settings, table: dict | None = None, gpus: list[GpuInfo] | None = None) -> BootInfo:
    """Detect the card (or take the override), its class, and choose the profile from the table."""
    table = profiles.load_table(settings.profile_table) if table is None else table
    gpus = nvml_gpus() if gpus is None else gpus
    ram_gib = settings.ram_gb or host_ram_gib()
    host = socket.gethostname()
    use_gpu = bool(gpus) and settings.device != "cpu"
    if use_gpu:
        gpu = gpus[0]
        if settings.vram_gb:
            vram_class = profiles.class_for_override(settings.vram_gb)
            vram_gib = settings.vram_gb
            cap_gib = profiles.CLASS_CAPS_GIB[vram_class]
        else:
            vram_class = profiles.class_for_vram(gpu.total_gib)
            vram_gib = gpu.total_gib
            cap_gib = None
            if vram_class is None:
                log.warning("%s has %.1f GiB, below the smallest class: rendering on the CPU", gpu.name, gpu.total_gib)
        if vram_class is not None:
            choice = profiles.choose(table, vram_class, ram_gib, forced=settings.profile,
                                     allow_lossy=settings.allow_lossy)
            return BootInfo(host=host, device="cuda", gpu=gpu.name, vram_gib=vram_gib, vram_class=vram_class,
                            cap_gib=cap_gib, compute_capability=gpu.compute_capability,
                            host_ram_gib=round(ram_gib, 1), choice=choice)
    # CPU: the override only sets the class registered and the queues served (for tests and
    # simulated fleets); the render itself runs on the CPU.
    if settings.vram_gb:
        vram_class = profiles.class_for_override(settings.vram_gb)
        try:
            choice = profiles.choose(table, vram_class, None, forced=settings.profile,
                                     allow_lossy=settings.allow_lossy)
        except profiles.ProfileError:
            choice = profiles.Choice(vram_class, settings.profile or profiles.CPU_CLASS, None, None, None,
                                     profiles.REFERENCE_PIXELS, profiles.CLASS_CAPS_GIB[vram_class])
        return BootInfo(host=host, device="cpu", gpu="cpu", vram_gib=settings.vram_gb, vram_class=vram_class,
                        cap_gib=None, compute_capability="", host_ram_gib=round(ram_gib, 1), choice=choice)
    choice = profiles.choose(table, profiles.CPU_CLASS, ram_gib, forced=settings.profile,
                             allow_lossy=settings.allow_lossy)
    return BootInfo(host=host, device="cpu", gpu="cpu", vram_gib=0.0, vram_class=profiles.CPU_CLASS,
                    cap_gib=None, compute_capability="", host_ram_gib=round(ram_gib, 1), choice=choice)
