"""Fused projections in the Z-Image DiT blocks: q, k and v as one matmul, the gated feed-forward's
w1 and w3 as another.

Each block's attention otherwise runs three 3840x3840 matmuls on the same input and its feed-forward
two 3840x10240 ones; fused, the input is scaled and rounded to fp8 (`worker.engine.fp8`) once instead
of three or two times, and one launch replaces several. The result is the same arithmetic: the fused
weight is the layers' weights stacked on the output axis (with their per-channel fp8 scales), so a
fused profile draws the same pixels as the unfused one. What each piece saved is in
docs/performance.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn

from worker.engine import fp8
from worker.engine.kernels import qk_norm_rope, silu_gate
from worker.engine.rope import apply_rotary_emb as _apply_rotary_emb
from worker.engine.rope import apply_rotary_emb_real as _apply_rotary_emb_real

BLOCK_LISTS = ("noise_refiner", "context_refiner", "layers")


def concat_linears(layers: list[torch.nn.Module]) -> torch.nn.Module:
    """One layer whose output is the outputs of `layers` (same input) concatenated."""
    if all(isinstance(layer, fp8.Fp8Linear) for layer in layers):
        return fp8.Fp8Linear.concat(layers)
    if not all(type(layer) is torch.nn.Linear for layer in layers):
        raise TypeError(f"cannot fuse {sorted({type(layer).__name__ for layer in layers})}: only torch Linear "
                        "layers or all-fp8 layers are fused")
    first = layers[0]
    has_bias = first.bias is not None
    fused = torch.nn.Linear(first.in_features, sum(layer.out_features for layer in layers), bias=has_bias,
                            device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([layer.weight for layer in layers]))
        if has_bias:
            fused.bias.copy_(torch.cat([layer.bias for layer in layers]))
    fused.requires_grad_(False)
    return fused


class GatedFeedForward(torch.nn.Module):
    """Z-Image's SiLU-gated feed-forward, w2(silu(w1 x) * w3 x), with w1 and w3 in one layer `w13`.

    `gate_kernel`: where w2 runs an fp8 matmul, the gate and w2's row scaling run as one hand-written
    kernel (`worker.engine.kernels.silu_gate`) instead of inductor's; elsewhere it changes nothing. `gate_warps`: the
    kernel's warps a row (0: its default). `inline`: call the kernel's triton_op, which inductor
    launches from its own code, instead of its custom op."""

    def __init__(self, w13: torch.nn.Module, w2: torch.nn.Module, gate_kernel: bool = False, gate_warps: int = 0,
                 inline: bool = False):
        super().__init__()
        self.w13 = w13
        self.w2 = w2
        self.gate_kernel = gate_kernel and isinstance(w2, fp8.Fp8Linear) and w2.fp8_matmul
        self.gate_warps = gate_warps or silu_gate.NUM_WARPS
        self.gate_op = silu_gate.silu_gate_fp8_inline if inline else silu_gate.silu_gate_fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_value = self.w13(x)
        if self.gate_kernel:
            rows_fp8, row_scales = self.gate_op(gate_value.reshape(-1, gate_value.shape[-1]), self.gate_warps)
            return self.w2.matmul_fp8(rows_fp8, row_scales).reshape(*x.shape[:-1], self.w2.out_features)
        gate, value = gate_value.chunk(2, dim=-1)
        return self.w2(F.silu(gate) * value)


class FusedQKVAttnProcessor:
    """diffusers 0.42's ZSingleStreamAttnProcessor with q, k and v from one projection `attn.to_qkv`.

    The steps after the projection (q/k RMS norms, RoPE in float32, the attention backend dispatch, the
    output projection) are that processor's, kept in the same order so the numbers match.

    `cudnn`: call torch's cuDNN attention op directly rather than through SDPA's kernel choice, so the
    fastest kernel for Z-Image's attention is kept whatever SDPA's heuristics pick.

    `real_rope`: rotate q and k with `_apply_rotary_emb_real`, in real arithmetic that inductor fuses.

    `qk_kernel`: q and k's head norms and rotation in one hand-written kernel (`worker.engine.kernels.qk_norm_rope`), for
    an attention whose norms it supports (`qk_kernel_fits`); `inline`: through its triton_op."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, cudnn: bool = False, real_rope: bool = False, qk_kernel: bool = False, inline: bool = False):
        self.cudnn = cudnn
        self.rotate = _apply_rotary_emb_real if real_rope else _apply_rotary_emb
        self.qk_kernel = qk_kernel
        self.qk_op = qk_norm_rope.qk_norm_rope_inline if inline else qk_norm_rope.qk_norm_rope

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        qkv = attn.to_qkv(hidden_states)
        if self.qk_kernel and freqs_cis is not None and qkv.dim() == 3:
            query, key = self.qk_op(qkv, attn.norm_q.weight, attn.norm_k.weight, torch.view_as_real(freqs_cis),
                                    attn.heads, attn.norm_q.eps).unbind(0)
            value = qkv.chunk(3, dim=-1)[2].unflatten(-1, (attn.heads, -1))
        else:
            query, key, value = (t.unflatten(-1, (attn.heads, -1)) for t in qkv.chunk(3, dim=-1))
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if freqs_cis is not None:
                query = self.rotate(query, freqs_cis)
                key = self.rotate(key, freqs_cis)
        if self.cudnn and query.is_cuda and attention_mask is None:
            # (batch, heads, tokens, head_dim) views, as the op takes them; output back to tokens-first.
            hidden_states = torch.ops.aten._scaled_dot_product_cudnn_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), None, False)[0].transpose(1, 2)
            return self._project_out(attn, hidden_states, query.dtype)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                              is_causal=False, backend=self._attention_backend,
                                              parallel_config=self._parallel_config)
        return self._project_out(attn, hidden_states, query.dtype)

    @staticmethod
    def _project_out(attn, hidden_states: torch.Tensor, dtype) -> torch.Tensor:
        output = attn.to_out[0](hidden_states.flatten(2, 3).to(dtype))
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        return output


def qk_kernel_fits(attn) -> bool:
    """Whether `worker.engine.kernels.qk_norm_rope` computes this attention's q/k norms: diffusers RMS norms with weights
    of one dtype, no bias, one epsilon, over heads of a power-of-two size."""
    norms = (attn.norm_q, attn.norm_k)
    return (all(type(norm).__name__ == "RMSNorm" and getattr(norm, "weight", None) is not None
                and getattr(norm, "bias", None) is None for norm in norms)
            and attn.norm_q.weight.dtype == attn.norm_k.weight.dtype and attn.norm_q.eps == attn.norm_k.eps
            and not attn.norm_q.weight.numel() & (attn.norm_q.weight.numel() - 1))


def fuse_projections(transformer: torch.nn.Module, cudnn_attention: bool = False, real_rope: bool = False,
                     gate_kernel: bool = False, qk_kernel: bool = False, triton_ops: bool = False,
                     gate_warps: int = 0) -> int:
    """Fuse q/k/v and w1/w3 in every block of a Z-Image DiT, in place (layers already on their device
    stay there: each block's fused weights are built beside its old ones, one block at a time).
    Returns how many blocks were fused. Call after fp8 conversion and before compiling.
    `cudnn_attention`: the fused processor calls cuDNN attention directly (see FusedQKVAttnProcessor).
    `real_rope`: it rotates q and k in real arithmetic, which compiles into one kernel (same numbers).
    `gate_kernel`: the feed-forwards run their gate through `worker.engine.kernels.silu_gate` (GatedFeedForward),
    with `gate_warps` warps a row (0: the kernel's default).
    `qk_kernel`: the attentions normalise and rotate q and k through `worker.engine.kernels.qk_norm_rope`.
    `triton_ops`: those kernels are called through their triton_ops, which inductor launches itself."""
    fused = 0
    for list_name in BLOCK_LISTS:
        for block in getattr(transformer, list_name, ()):
            attn = block.attention
            attn.to_qkv = concat_linears([attn.to_q, attn.to_k, attn.to_v])
            del attn.to_q, attn.to_k, attn.to_v
            attn.set_processor(FusedQKVAttnProcessor(cudnn=cudnn_attention, real_rope=real_rope,
                                                     qk_kernel=qk_kernel and qk_kernel_fits(attn),
                                                     inline=triton_ops))
            ff = block.feed_forward
            block.feed_forward = GatedFeedForward(concat_linears([ff.w1, ff.w3]), ff.w2, gate_kernel=gate_kernel,
                                                  gate_warps=gate_warps, inline=triton_ops)
            fused += 1
    return fused
