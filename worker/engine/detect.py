"""What this worker runs on: GPU, architecture and its capabilities, VRAM class, host RAM, and the
profile it will use (with the ones it steps down to if that one fails its boot self-test).

Runs in the Celery parent before the pool forks, so it must not create a CUDA context (a CUDA
context in the parent breaks the forked children): NVML reads the card without one, and the torch and
Triton versions come from package metadata, without importing them.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
from dataclasses import asdict, dataclass

from shared import archs, profiles

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
    arch: str = ""                          # "sm_86"; the emulated one under ZFARM_EMULATE_ARCH
    capabilities: archs.Capabilities | None = None   # None on the CPU
    fallbacks: tuple = ()                   # Choices to step down to, in order, if `choice` fails its self-test

    def to_dict(self) -> dict:
        out = asdict(self)
        out["choice"] = self.choice.to_dict()
        out["capabilities"] = self.capabilities.to_dict() if self.capabilities else None
        out["fallbacks"] = [c.profile for c in self.fallbacks]
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


def package_version(name: str) -> str:
    """An installed package's version, read from its metadata (nothing imported); "" when absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def card_capabilities(gpu: GpuInfo, emulate_arch: str = "") -> archs.Capabilities:
    """What `gpu` can do with the torch and Triton installed here; with `emulate_arch`, what a card of
    that architecture could (and the engine then plays it: `worker.engine.emulation`)."""
    torch_version, triton_version = package_version("torch"), package_version("triton")
    real = archs.arch_name(gpu.compute_capability)
    if emulate_arch:
        return archs.capabilities(archs.parse_arch(emulate_arch).name, torch_version, triton_version, emulated_on=real)
    return archs.capabilities(real, torch_version, triton_version)


def detect(settings, table: dict | None = None, gpus: list[GpuInfo] | None = None) -> BootInfo:
    """Detect the card (or take the override), its class and capabilities, and choose the profile (and
    the ones to step down to) from the table."""
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
            caps = card_capabilities(gpu, settings.emulate_arch)
            choice = profiles.choose(table, vram_class, ram_gib, forced=settings.profile,
                                     allow_lossy=settings.allow_lossy, caps=caps)
            fallbacks = () if settings.profile else tuple(
                profiles.fallbacks(table, choice, ram_gib, settings.allow_lossy, caps))
            return BootInfo(host=host, device="cuda", gpu=gpu.name, vram_gib=vram_gib, vram_class=vram_class,
                            cap_gib=cap_gib, compute_capability=gpu.compute_capability,
                            host_ram_gib=round(ram_gib, 1), choice=choice, arch=caps.arch, capabilities=caps,
                            fallbacks=fallbacks)
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
                        cap_gib=None, compute_capability="", host_ram_gib=round(ram_gib, 1), choice=choice,
                        arch="cpu")
    choice = profiles.choose(table, profiles.CPU_CLASS, ram_gib, forced=settings.profile,
                             allow_lossy=settings.allow_lossy)
    return BootInfo(host=host, device="cpu", gpu="cpu", vram_gib=0.0, vram_class=profiles.CPU_CLASS,
                    cap_gib=None, compute_capability="", host_ram_gib=round(ram_gib, 1), choice=choice, arch="cpu")
