"""Playing another GPU architecture on the card at hand (`ZFARM_EMULATE_ARCH=sm_86`), to verify
without that card what a worker would do there.

Under emulation, in this process:
- the chooser and the engine see the emulated architecture's capabilities (`shared.archs`): no fp8
  matmul below sm_89 (`fp8.has_fp8_matmul`), no bf16 below sm_80 (`pipeline.default_dtype`);
- every Triton compile first runs Triton's front end (to the TTGIR stage) for the emulated target,
  so code that card's Triton refuses (e4m3 below sm_89: "type fp8e4nv not supported in this
  architecture") fails here the same way, torch.compile's generated kernels and the hand-written ones
  alike; code that passes is then compiled for, and runs on, the real card.

What emulation does not show: the emulated card's speed, its memory bandwidth, its kernels' own
code generation past the front end, or driver and cuDNN differences. Rows measured this way say
`emulated_arch` in the profile table, and docs say "emulated on the H100".

Which functions: Triton's `compile` (the same signature in Triton 3.6 and 3.9) is reached as
`triton.compile` (torch inductor), `triton.compiler.compile` (@triton.jit's binder, cached at the first
launch) and `triton.compiler.compiler.compile` (its definition); all three are rebound, before the
first kernel launch. Inductor's subprocess compile workers import Triton afresh, without the wrapper,
so compiling is kept in this process (`compile_threads = 1`).
"""
from __future__ import annotations

import functools
import logging

from shared import archs

log = logging.getLogger(__name__)

# Options @triton.jit passes that its backend derived from the real target; left in, the emulated
# compile would inherit the real card's fp8 permissions.
_TARGET_DERIVED_OPTIONS = ("arch", "supported_fp8_dtypes", "deprecated_fp8_dot_operand_dtypes")
# The emulated compile stops after this stage: the type checks that differ by architecture are in the
# front end, and stopping there avoids LLVM and ptxas (and Triton 3.6's triton-lang/triton#9364, where a
# later lowering for an older target reused the newer target's fp8 conversions).
_STOP_AFTER = "ttgir"

_active: dict = {}


def active() -> archs.Capabilities | None:
    """The emulated card's capabilities, or None when this process runs as the card it has."""
    return _active.get("caps")


def activate(arch: str, torch_version: str, triton_version: str, real_arch: str) -> archs.Capabilities:
    """Play `arch` ("sm_86") from now on in this process. Idempotent for the same arch."""
    spec = archs.parse_arch(arch)
    caps = archs.capabilities(spec.name, torch_version, triton_version, emulated_on=real_arch)
    if _active.get("caps") is not None and _active["caps"].arch != spec.name:
        raise RuntimeError(f"already emulating {_active['caps'].arch}; one architecture per process")
    _active["caps"] = caps
    _install_triton_cap(spec.compute_capability[0] * 10 + spec.compute_capability[1])
    log.warning("emulating %s on %s: capabilities %s; Triton code is checked for %s before it compiles",
                spec.name, real_arch, sorted(caps.features), spec.name)
    return caps


def _install_triton_cap(target_arch: int) -> None:
    try:
        import triton
        import triton.compiler
        import triton.compiler.compiler as tcc
        from triton.backends.compiler import GPUTarget
    except ImportError:  # no Triton: nothing compiles, nothing to cap
        return
    if "original" in _active:
        return
    original = tcc.compile

    @functools.wraps(original)
    def compile(src, target=None, options=None, _env_vars=None):
        real = target or triton.runtime.driver.active.get_current_target()
        if real.backend == "cuda" and real.arch != target_arch:
            emulated = GPUTarget("cuda", target_arch, real.warp_size)
            options_there = None if options is None else {
                k: v for k, v in dict(options).items() if k not in _TARGET_DERIVED_OPTIONS}
            _front_end(src, emulated, options_there)
        return original(src, target=real, options=options, _env_vars=_env_vars)

    _active["original"] = original
    triton.compile = triton.compiler.compile = tcc.compile = compile
    try:
        from torch._inductor import config as inductor_config

        inductor_config.compile_threads = 1
    except ImportError:
        pass


def _front_end(src, target, options) -> None:
    """Triton's stages for `target` up to `_STOP_AFTER`, uncached: raises what that card's Triton raises."""
    from triton._C.libtriton import ir
    from triton.compiler.compiler import ASTSource, make_backend

    if not isinstance(src, ASTSource):
        return  # IR text (TRITON_KERNEL_OVERRIDE): only the real compile checks it
    backend = make_backend(target)
    opts = backend.parse_options(dict(options or {}, **src.parse_options()))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context)
    stages: dict = {}
    backend.add_stages(stages, opts, src.language)
    metadata: dict = {}
    for name, stage in list(stages.items())[1:]:
        module = stage(module, metadata)
        if name == _STOP_AFTER:
            break


def deactivate() -> None:
    """Back to the real card (tests)."""
    if "original" in _active:
        import triton
        import triton.compiler
        import triton.compiler.compiler as tcc

        triton.compile = triton.compiler.compile = tcc.compile = _active["original"]
    _active.clear()
