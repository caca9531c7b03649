"""bench/kernels.py is a GPU measuring tool: on a machine without one it stops and says so."""
from __future__ import annotations

import pytest

from bench import kernels


def test_the_kernel_benchmark_refuses_to_run_without_a_cuda_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        kernels.main(["--tokens", "64"])


def test_a_matrix_runs_kernel_trace_returns_the_calls_wall_time_and_sums_only_gpu_kernels():
    """On a CPU the traced call runs and is timed, and no CPU op is counted as GPU kernel time."""
    import torch

    from bench import profiles

    def call() -> float:
        torch.randn(256, 256) @ torch.randn(256, 256)
        return 0.125

    trace = profiles.kernel_trace(call)
    assert trace["wall_s"] == 0.125
    assert (trace["kernels_s"], trace["copies_s"], trace["kernel_launches"], trace["top"]) == (0, 0, 0, [])
    assert profiles._trace_summary({"trace": trace}).startswith("\n    traced call 0.125 s: kernels 0")
