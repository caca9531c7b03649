"""A stand-in for NVML (nvidia-ml-py's `pynvml`) at its boundary, for tests on machines without GPUs.

Cards come from the FAKE_NVML_GPUS environment variable: JSON list of
{"name": ..., "total_gib": ..., "cc": "8.6"}. Put this folder first on PYTHONPATH.
"""
import json
import os


class NVMLError(Exception):
    pass


class _Memory:
    def __init__(self, total):
        self.total, self.free, self.used = total, total, 0


def _cards():
    return json.loads(os.environ.get("FAKE_NVML_GPUS", "[]"))


def nvmlInit():
    if not _cards():
        raise NVMLError("fake NVML: no cards configured")


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return len(_cards())


def nvmlDeviceGetHandleByIndex(index):
    return _cards()[index]


def nvmlDeviceGetName(handle):
    return handle["name"]


def nvmlDeviceGetMemoryInfo(handle):
    return _Memory(int(handle["total_gib"] * 2**30))


def nvmlDeviceGetCudaComputeCapability(handle):
    major, minor = handle.get("cc", "8.6").split(".")
    return int(major), int(minor)
