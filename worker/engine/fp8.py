"""Native fp8 linear layers: weights stored as float8_e4m3fn with one scale per output channel.

Unlike diffusers' layerwise casting (a hook that casts the whole weight with no scale at every call),
the weight here is an fp8 tensor with a scale, so `torch.compile(fullgraph=True)` traces straight
through it, and on GPUs with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper and later) the
matmul itself runs in fp8 (`torch._scaled_mm`, row-wise scales: one per activation row and one per
weight channel, bf16 output). Elsewhere (Ampere, CPU) the weight is dequantised to the compute dtype
at each call: half the memory, bf16 speed.

The scaled layout (per-channel weight scale, dynamic per-row activation scale) is the one torchao
calls float8 "rowwise"; it is written here on torch's own op to keep torchao out of the dependencies.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from shared import archs
from worker.engine import emulation

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)   # 448
# _scaled_mm needs the inner and output sizes to be multiples of 16.
_ALIGN = 16
MIN_SCALE = 1e-12
# Linear layers worth converting: the transformer blocks of the DiT and of the text encoder. The DiT's
# adaLN modulation (one row per image, sets the scales and gates of every block) stays in bf16: it is
# tiny, and its output multiplies everything downstream.
DIT_TARGETS = re.compile(r"^(layers|noise_refiner|context_refiner)\.\d+\.(attention|feed_forward)\.")
TEXT_ENCODER_TARGETS = re.compile(r"^(model\.)?layers\.\d+\.(self_attn|mlp)\.")


def has_fp8_matmul(device) -> bool:
    """True on CUDA GPUs with fp8 tensor cores (compute capability 8.9 or later), unless this process
    plays an architecture without them (`worker.engine.emulation`)."""
    if not torch.cuda.is_available() or torch.device(device).type != "cuda":
        return False
    emulated = emulation.active()
    if emulated is not None and not emulated.meets(archs.FP8_MATMUL):
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale of shape (out, 1)) with weight ~= fp8 * scale, channel by channel."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 rows, float32 scale of shape (rows, 1)) with rows ~= fp8 * scale: the activation side of an
    fp8 matmul, one scale per row so one large token does not flatten the others."""
    x32 = rows.float()
    x_scale = (x32.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (x32 / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), x_scale


class Fp8Linear(torch.nn.Module):
    """A bias-optional Linear whose weight is fp8 with per-output-channel scales.

    The tensors are frozen parameters, not buffers: diffusers' streamed group offload (0.42) moves a
    block's buffers to the GPU but never back, so fp8 buffers would pile up on the card."""

    def __init__(self, weight_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype, fp8_matmul: bool, fast_accum: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.compute_dtype = compute_dtype
        self.fp8_matmul = fp8_matmul
        # Hopper's fp8 tensor cores accumulate in reduced precision unless the kernel promotes partial
        # sums to float32 every few steps; fast_accum skips that promotion (faster, slightly less exact).
        self.fast_accum = fast_accum
        self.weight = torch.nn.Parameter(weight_fp8, requires_grad=False)
        # (1, out) for _scaled_mm's row-wise scale of the second operand; float32 as it requires.
        self.weight_scale = torch.nn.Parameter(scale.reshape(1, -1).contiguous(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(compute_dtype),
                                                                 requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, compute_dtype: torch.dtype, fp8_matmul: bool,
                    device=None, fast_accum: bool = False) -> "Fp8Linear":
        weight = linear.weight if device is None else linear.weight.to(device)
        bias = None if linear.bias is None else (linear.bias if device is None else linear.bias.to(device))
        weight_fp8, scale = quantize_weight(weight)
        return cls(weight_fp8, scale, bias, compute_dtype, fp8_matmul, fast_accum)

    @classmethod
    def concat(cls, layers: list["Fp8Linear"]) -> "Fp8Linear":
        """One layer computing all of `layers` (same input) side by side on the output axis. Exact: each
        output channel keeps its own weight scale, and the input's row scales do not depend on the weight."""
        first = layers[0]
        biases = [layer.bias for layer in layers]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            raise ValueError("cannot fuse layers where only some have a bias")
        bias = None if biases[0] is None else torch.cat([b.data for b in biases])
        return cls(torch.cat([layer.weight.data for layer in layers]),
                   torch.cat([layer.weight_scale.data for layer in layers], dim=1).reshape(-1, 1),
                   bias, first.compute_dtype, first.fp8_matmul, first.fast_accum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8_matmul:
            weight = self.weight.to(self.compute_dtype) * self.weight_scale.t().to(self.compute_dtype)
            return F.linear(x.to(self.compute_dtype), weight, self.bias)
        x_fp8, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        return self.matmul_fp8(x_fp8, x_scale).reshape(*x.shape[:-1], self.out_features)

    def matmul_fp8(self, x_fp8: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """The layer on input rows already in fp8 with their scales (`quantize_rows`): (rows, out)."""
        out = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               out_dtype=self.compute_dtype, use_fast_accum=self.fast_accum)
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8_matmul={self.fp8_matmul}, fast_accum={self.fast_accum}")


def _convertible(name: str, module: torch.nn.Module, pattern: re.Pattern) -> bool:
    return (isinstance(module, torch.nn.Linear) and pattern.search(name) is not None
            and module.in_features % _ALIGN == 0 and module.out_features % _ALIGN == 0)


def targets_for(model: torch.nn.Module) -> re.Pattern:
    """The layer-name pattern for a Z-Image DiT or a Qwen3 text encoder."""
    return DIT_TARGETS if hasattr(model, "noise_refiner") else TEXT_ENCODER_TARGETS


def convert(model: torch.nn.Module, compute_dtype: torch.dtype, fp8_matmul: bool, work_device=None,
            out_device=None, pattern: re.Pattern | None = None, fast_accum: bool = False) -> int:
    """Replace the model's target Linear layers with Fp8Linear, one at a time.

    Each weight is quantised on `work_device` (the GPU: seconds for billions of weights, where the CPU
    takes minutes) and the fp8 copy kept on `out_device` (default: the work device), so neither the
    GPU nor the host ever holds the whole model twice. Returns how many layers were converted.
    """
    pattern = pattern or targets_for(model)
    names = [name for name, module in model.named_modules() if _convertible(name, module, pattern)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = Fp8Linear.from_linear(getattr(parent, child), compute_dtype, fp8_matmul, device=work_device,
                                      fast_accum=fast_accum)
        if out_device is not None:
            layer = layer.to(out_device)
        setattr(parent, child, layer)
    return len(names)
