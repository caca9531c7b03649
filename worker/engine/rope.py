"""Z-Image's rotary position embedding of q and k: the complex rotation diffusers' processor runs, and
the same rotation written in real arithmetic. The fused processor (`worker.engine.fuse`) and the q/k kernel's
CPU reference (`worker.engine.kernels.qk_norm_rope`) rotate with these."""
from __future__ import annotations

import torch


def apply_rotary_emb(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # In float32 complex numbers, as diffusers' processor does: bf16 rotations drift visibly.
    with torch.amp.autocast("cuda", enabled=False):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        x_out = torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3)
        return x_out.type_as(x_in)


def apply_rotary_emb_real(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """The same rotation in float32 real arithmetic, (a + bi)(c + di) written out: the same products
    and sums (bit-identical on the CPU, tested), but inductor fuses it with the q/k norms and the casts.
    Inductor has no code generation for complex numbers: `apply_rotary_emb` compiles to separate eager
    kernels that write q and k in float32 and read them back, in every block of every forward."""
    return rotate_real(x_in, torch.view_as_real(freqs_cis))


def rotate_real(x_in: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """`apply_rotary_emb_real` given `rope`, the real view of `freqs_cis`: (batch, tokens, head_dim/2, 2)."""
    with torch.amp.autocast("cuda", enabled=False):
        x_re, x_im = x_in.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = rope.unsqueeze(2).unbind(-1)
        return torch.stack((x_re * cos - x_im * sin, x_re * sin + x_im * cos), dim=-1).flatten(3).type_as(x_in)
