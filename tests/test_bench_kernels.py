"""bench/kernels.py is a GPU measuring tool: on a machine without one it stops and says so."""
from __future__ import annotations

import pytest

from bench import kernels


def test_the_kernel_benchmark_refuses_to_run_without_a_cuda_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        kernels.main(["--tokens", "64"])
