"""A hand-written GPU kernel for the DiT feed-forward's gate: silu(gate) * value, scaled row by row and
rounded to fp8 for the next fp8 matmul (`worker.engine.fp8`), in one pass over the row.

Compiled by inductor, the same arithmetic is a looped row reduction: each 10240-value row is read
once to find its largest magnitude and again to scale it. Here one program holds its whole row in
registers, so the 40 KB of gate and value are read once (its speed: docs/performance.md).

`silu_gate_fp8` is a torch custom op: `torch.compile(fullgraph=True)` traces it as one opaque call.
`silu_gate_fp8_inline` is the same declared with `torch.library.triton_op`: inductor launches the
kernel from its own generated code instead of calling back into Python. On a CUDA tensor each runs
the Triton kernel; elsewhere (CPU, and the tests) the same arithmetic in torch.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from worker.engine import fp8

# Warps per row program: 16 spread the DiT's rows (10240 values, a 16384-wide block) 32 values of gate
# and of value to a thread. Profiles may ask for others (`Spec.gate_warps`); bench/kernels.py times them.
NUM_WARPS = 16


def reference(gate_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic in torch: float32 throughout, as inductor computes the unfused code."""
    gate, value = gate_value.float().chunk(2, dim=-1)
    return fp8.quantize_rows(F.silu(gate) * value)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def silu_gate_fp8_kernel(gv_ptr, out_ptr, scale_ptr, width, gv_row_stride, out_row_stride,
                             fp8_max, min_scale, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        row_ptr = gv_ptr + row * gv_row_stride
        gate = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        value = tl.load(row_ptr + width + cols, mask=mask, other=0.0).to(tl.float32)
        gated = gate * tl.sigmoid(gate) * value  # masked lanes are 0 and leave the maximum alone
        scale = tl.maximum(tl.max(tl.abs(gated), axis=0) / fp8_max, min_scale)
        scaled = tl.clamp(gated / scale, -fp8_max, fp8_max)
        tl.store(out_ptr + row * out_row_stride + cols, scaled.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)

    return silu_gate_fp8_kernel


def run_kernel(gate_value: torch.Tensor, num_warps: int = NUM_WARPS, out_dtype: torch.dtype = fp8.FP8_DTYPE,
               launch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel on a (rows, 2 * width) tensor whose rows are contiguous. `out_dtype` float32
    keeps the scaled rows unrounded (the tests check the kernel's arithmetic that way in Triton's
    interpreter, whose fp8 rounding differs from the GPU's). `launch` wraps the kernel
    (`torch.library.wrap_triton` for the inline op)."""
    import triton

    rows, double_width = gate_value.shape
    width = double_width // 2
    out = torch.empty((rows, width), device=gate_value.device, dtype=out_dtype)
    scale = torch.empty((rows, 1), device=gate_value.device, dtype=torch.float32)
    if rows:  # Triton refuses an empty grid
        kernel = _kernel() if launch is None else launch(_kernel())
        kernel[(rows,)](gate_value, out, scale, width, gate_value.stride(0), out.stride(0), fp8.FP8_MAX,
                        fp8.MIN_SCALE, BLOCK=triton.next_power_of_2(width), num_warps=num_warps)
    return out, scale


def _forward(gate_value: torch.Tensor, num_warps: int, launch=None) -> tuple[torch.Tensor, torch.Tensor]:
    if gate_value.dim() != 2 or gate_value.shape[1] % 2:
        raise ValueError(f"silu_gate_fp8 takes (rows, 2 * width), got {tuple(gate_value.shape)}")
    if gate_value.is_cuda:
        return run_kernel(gate_value.contiguous(), num_warps, launch=launch)
    return reference(gate_value)


@torch.library.custom_op("zfarm::silu_gate_fp8", mutates_args=())
def silu_gate_fp8(gate_value: torch.Tensor, num_warps: int = NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 rows, float32 row scales of shape (rows, 1)) of silu(gate) * value, where `gate_value` is
    (rows, 2 * width) with the gate in the first half of each row: the fused w1/w3 output."""
    return _forward(gate_value, num_warps)


@silu_gate_fp8.register_fake
def _(gate_value: torch.Tensor, num_warps: int = NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    rows, double_width = gate_value.shape
    return (gate_value.new_empty((rows, double_width // 2), dtype=fp8.FP8_DTYPE),
            gate_value.new_empty((rows, 1), dtype=torch.float32))


@torch.library.triton_op("zfarm::silu_gate_fp8_inline", mutates_args=())
def silu_gate_fp8_inline(gate_value: torch.Tensor, num_warps: int = NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """`silu_gate_fp8`, declared so that inductor launches the kernel from its generated code."""
    return _forward(gate_value, num_warps, launch=torch.library.wrap_triton)
