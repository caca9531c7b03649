"""Each hand-written Triton kernel compiled for every architecture users run (no GPU needed: Triton
compiles for a named target). Triton refuses float8_e4m3fn below sm_89, so the kernel that stores e4m3
must be refused there, and the profiles using it must say so (`specs.requirements`), or an Ampere or
Turing card would be handed a profile it cannot compile."""
from __future__ import annotations

import pytest
from triton.compiler import CompilationError

from bench import kernel_code
from shared import archs
from worker.engine import specs

# Triton's compute capability numbers of the architectures zfarm knows.
TARGETS = {name: a.compute_capability[0] * 10 + a.compute_capability[1] for name, a in archs.ARCHS.items()
           if name != "sm_87"}
# The kernels that load or store e4m3.
USES_E4M3 = {"gate"}


@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("kernel", list(kernel_code.KERNELS))
def test_each_kernel_compiles_for_each_architecture_that_has_its_types_and_is_refused_below(kernel, arch):
    cc = TARGETS[arch]
    if kernel in USES_E4M3 and not archs.capabilities(arch, "2.11", "3.6").meets(archs.TRITON_E4M3):
        with pytest.raises(CompilationError, match="type fp8e4nv not supported in this architecture"):
            kernel_code.compile_for(kernel, cc)
        return
    compiled = kernel_code.compile_for(kernel, cc)
    assert f".target sm_{cc}" in compiled["ptx"] and compiled["cubin"]


def test_every_profile_using_the_e4m3_kernel_requires_triton_e4m3():
    for name, spec in specs.SPECS.items():
        if spec.gate_kernel:
            assert archs.TRITON_E4M3 in specs.requirements(spec), name
