"""Playing another architecture (ZFARM_EMULATE_ARCH) on the card at hand: Triton code is checked for the
emulated target before it is compiled for the real one, so code an Ampere card's Triton refuses fails
here the same way; the engine's capability checks answer as that card would. Run on the CPU against a
named H100 target, as torch inductor names its target."""
from __future__ import annotations

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import CompilationError

from bench import kernel_code
from shared import archs
from worker.engine import emulation, fp8, pipeline

H100 = GPUTarget("cuda", 90, 32)


@pytest.fixture
def playing():
    def play(arch: str) -> archs.Capabilities:
        return emulation.activate(arch, torch.__version__, triton.__version__, real_arch="sm_90")
    yield play
    emulation.deactivate()


def compile_gate_kernel_for_an_h100():
    """The e4m3-storing kernel, compiled the way inductor compiles (triton.compile with a named target)."""
    case = kernel_code.KERNELS["gate"]
    kernel = case.kernel()
    signature = dict(zip(kernel.arg_names, case.types, strict=True))
    return triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs=case.constexprs),
                          target=H100, options={"num_warps": 4})


def test_without_emulation_the_e4m3_kernel_compiles_for_an_h100():
    assert ".target sm_90a" in compile_gate_kernel_for_an_h100().asm["ptx"]


def test_playing_sm_86_refuses_the_e4m3_kernel_as_an_ampere_card_would(playing):
    caps = playing("sm_86")
    assert caps.arch == "sm_86" and caps.emulated_on == "sm_90" and not caps.meets(archs.TRITON_E4M3)
    with pytest.raises(CompilationError, match="type fp8e4nv not supported in this architecture"):
        compile_gate_kernel_for_an_h100()


def test_playing_sm_86_still_compiles_other_kernels_for_the_real_card(playing):
    playing("sm_86")
    qk = kernel_code.compile_for("qk", 90)
    assert ".target sm_90a" in qk["ptx"]


def test_playing_sm_89_accepts_e4m3_like_an_ada_card(playing):
    playing("sm_89")
    assert ".target sm_90a" in compile_gate_kernel_for_an_h100().asm["ptx"]


def test_playing_an_older_card_turns_off_fp8_matmul_and_bf16_in_the_engine(playing, monkeypatch):
    # The engine's checks on a CUDA machine, answered here as if it were one (an H100).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert fp8.has_fp8_matmul("cuda") and pipeline.default_dtype("cuda") == torch.bfloat16
    playing("sm_75")
    assert not fp8.has_fp8_matmul("cuda")
    assert pipeline.default_dtype("cuda") == torch.float32


def test_one_process_plays_one_architecture(playing):
    playing("sm_86")
    with pytest.raises(RuntimeError, match="already emulating sm_86"):
        playing("sm_80")
