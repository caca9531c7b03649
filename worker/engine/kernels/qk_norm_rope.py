"""A hand-written GPU kernel for what each DiT attention does to q and k between the fused q/k/v
projection and attention: the RMS norm of every head (with its weight) and the rotary embedding, for
q and k in one launch.

Compiled by inductor, the same steps are two looped row reductions an attention (one for q, one for
k), each reading and writing its rows at well under the card's bandwidth. Here one program holds one
token's 30 heads of q (or of k), reads and writes whole rows, and pairs each value with its rotation
partner in registers, so every global access is 16 bytes wide (tests/test_qk_kernel.py pins that in
the code compiled for sm_90). Its speed, and that of the versions before it, is in docs/performance.md
(`python -m bench.kernels --only qk` measures it).

The arithmetic is diffusers' eager arithmetic: the norm in float32, rounded to the weight's dtype,
times the weight, rounded again, then the rotation in float32 (`worker.engine.rope`) and a last rounding
(each rounding a no-op for float32 weights).

`qk_norm_rope` is a torch custom op, opaque to `torch.compile`; `qk_norm_rope_inline` is the same
declared with `torch.library.triton_op`, which inductor launches from its own generated code. On a
CUDA tensor each runs the Triton kernel; elsewhere (CPU, and the tests) the same arithmetic in torch.
"""
from __future__ import annotations

import functools

import torch

from worker.engine.rope import rotate_real

# 8 warps: 16 values a thread, and the compiled code pairs them with no trip through shared memory
# (at 4 warps it takes one, with barriers: sm_90 code from Triton 3.6.0, 288 against 496 instructions).
NUM_WARPS = 8


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """diffusers' RMSNorm with a half-precision weight, step for step."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + eps)).to(weight.dtype) * weight


def reference(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, rope: torch.Tensor,
              heads: int, eps: float) -> torch.Tensor:
    """The kernel's arithmetic in torch: q and k stacked on a new first axis, (2, batch, tokens, heads,
    head_dim). `rope` is the real view of the rotation's complex factors, (batch, tokens, head_dim/2, 2)."""
    query, key, _ = (part.unflatten(-1, (heads, -1)) for part in qkv.chunk(3, dim=-1))
    return torch.stack([rotate_real(rms_norm(query, q_weight, eps), rope),
                        rotate_real(rms_norm(key, k_weight, eps), rope)])


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def qk_norm_rope_kernel(qkv_ptr, q_weight_ptr, k_weight_ptr, rope_ptr, out_ptr, heads,
                            qkv_batch_stride, qkv_token_stride, rope_batch_stride, rope_token_stride,
                            out_part_stride, out_batch_stride, out_token_stride, eps,
                            HEADS_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        batch = tl.program_id(1).to(tl.int64)
        part = tl.program_id(2)  # 0: q, 1: k
        head = tl.arange(0, HEADS_BLOCK)[:, None]
        col = tl.arange(0, HEAD_DIM)
        mask = head < heads
        # Every read and the write are whole contiguous rows; the rotation pairs neighbours (2i, 2i + 1),
        # which a reshape to (..., HEAD_DIM / 2, 2) and a split hand to the same thread. (Loading the even
        # and the odd values apart, strided, ran a first version at a seventh of the card's bandwidth.)
        row = qkv_ptr + batch * qkv_batch_stride + token * qkv_token_stride + part * heads * HEAD_DIM + head * HEAD_DIM
        x = tl.load(row + col[None, :], mask=mask, other=0.0).to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        weight = tl.where(part == 0, tl.load(q_weight_ptr + col), tl.load(k_weight_ptr + col))[None, :]
        # Half-precision products as eager takes them: exact in float32, then rounded.
        weight_dtype = weight.dtype
        normed = ((x * inv_rms).to(weight_dtype).to(tl.float32) * weight.to(tl.float32)).to(weight_dtype)
        a, b = tl.split(tl.reshape(normed.to(tl.float32), (HEADS_BLOCK, HEAD_DIM // 2, 2)))
        # rope holds each pair's (cos, sin), interleaved as the pairs are.
        rope_row = rope_ptr + batch * rope_batch_stride + token * rope_token_stride
        cos, sin = tl.split(tl.reshape(tl.load(rope_row + col), (HEAD_DIM // 2, 2)))
        cos, sin = cos[None, :], sin[None, :]
        # (a + bi)(cos + i sin), the products and sums of diffusers' complex rotation
        out = tl.reshape(tl.join(a * cos - b * sin, a * sin + b * cos), (HEADS_BLOCK, HEAD_DIM))
        dst = out_ptr + part * out_part_stride + batch * out_batch_stride + token * out_token_stride + head * HEAD_DIM
        tl.store(dst + col[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    return qk_norm_rope_kernel


def _check(qkv: torch.Tensor, rope: torch.Tensor, heads: int) -> None:
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"qk_norm_rope takes qkv as (batch, tokens, 3 * heads * head_dim) with {heads} heads, "
                         f"got {tuple(qkv.shape)}")
    head_dim = qkv.shape[-1] // (3 * heads)
    if head_dim & (head_dim - 1):
        raise ValueError(f"qk_norm_rope takes heads of a power-of-two size, got {head_dim}")
    if rope.shape != (*qkv.shape[:2], head_dim // 2, 2):
        raise ValueError(f"qk_norm_rope takes rope as (batch, tokens, {head_dim // 2}, 2), got {tuple(rope.shape)}")


def run_kernel(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, rope: torch.Tensor,
               heads: int, eps: float, launch=None, out_dtype: torch.dtype | None = None,
               num_warps: int = NUM_WARPS) -> torch.Tensor:
    """The Triton kernel; `launch` wraps the kernel (`torch.library.wrap_triton` for the inline op).
    `out_dtype` float32 keeps the results unrounded (the interpreter test reads them that way)."""
    import triton

    batch, tokens, width = qkv.shape
    head_dim = width // (3 * heads)
    out = torch.empty((2, batch, tokens, heads, head_dim), device=qkv.device, dtype=out_dtype or q_weight.dtype)
    if tokens and batch:  # Triton refuses an empty grid
        kernel = _kernel() if launch is None else launch(_kernel())
        kernel[(tokens, batch, 2)](qkv, q_weight, k_weight, rope, out, heads, qkv.stride(0), qkv.stride(1),
                                   rope.stride(0), rope.stride(1), out.stride(0), out.stride(1), out.stride(2), eps,
                                   HEADS_BLOCK=triton.next_power_of_2(heads), HEAD_DIM=head_dim,
                                   num_warps=num_warps)
    return out


def _forward(qkv, q_weight, k_weight, rope, heads, eps, launch=None) -> torch.Tensor:
    _check(qkv, rope, heads)
    if qkv.is_cuda:
        # The kernel addresses the last axes as dense rows.
        return run_kernel(qkv.contiguous(), q_weight.contiguous(), k_weight.contiguous(), rope.contiguous(),
                          heads, eps, launch)
    return reference(qkv, q_weight, k_weight, rope, heads, eps)


@torch.library.custom_op("zfarm::qk_norm_rope", mutates_args=())
def qk_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, rope: torch.Tensor,
                 heads: int, eps: float) -> torch.Tensor:
    """q and k of a fused q/k/v projection output, each head RMS-normed and rotated: (2, batch, tokens,
    heads, head_dim), q first, in the norm weights' dtype (as diffusers' norm returns them).
    `rope`: `torch.view_as_real` of the block's `freqs_cis`."""
    return _forward(qkv, q_weight, k_weight, rope, heads, eps)


@qk_norm_rope.register_fake
def _(qkv, q_weight, k_weight, rope, heads, eps):
    _check(qkv, rope, heads)
    batch, tokens, width = qkv.shape
    return qkv.new_empty((2, batch, tokens, heads, width // (3 * heads)), dtype=q_weight.dtype)


@torch.library.triton_op("zfarm::qk_norm_rope_inline", mutates_args=())
def qk_norm_rope_inline(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, rope: torch.Tensor,
                        heads: int, eps: float) -> torch.Tensor:
    """`qk_norm_rope`, declared so that inductor launches the kernel from its generated code."""
    return _forward(qkv, q_weight, k_weight, rope, heads, eps, launch=torch.library.wrap_triton)
