"""Native int8 linear layers (W8A8): int8 weights with one float32 scale per output channel, and
activations rounded to int8 at each call with one scale per row (token).

For GPUs with int8 tensor cores and no fp8 ones (Turing sm_75, Ampere sm_80/86): the matmul runs as
int8 x int8 -> int32 (`torch._int_mm`, cuBLASLt's int8 kernels, behind the op `int8_mm`), is rescaled
in float32 by the row and channel scales, and the bias is added in the compute dtype. Nothing here
touches an fp8 type, and the matmul itself is never Triton's, so the code torch.compile generates
around these layers is plain int8/float elementwise work and reductions that Triton compiles for any of
those targets (Triton refuses e4m3 below sm_89, and an int8 dot below sm_80).

It is `worker.engine.fp8`'s Fp8Linear with int8 in place of e4m3: the same targets (the transformer
blocks' projections of the DiT and of the text encoder; adaLN modulation, embedders and the final
layer stay in the load dtype), frozen parameters rather than buffers (diffusers' streamed group
offload moves buffers to the GPU and never back), the same layer-by-layer conversion.

Two paths multiply with the weight dequantised to the compute dtype instead: layers built with
`int8_matmul=False` (the text encoder, which runs once per prompt), and calls with fewer than
INT_MM_MIN_ROWS rows on CUDA, which `torch._int_mm` refuses there.

int8 is uniform where e4m3 is floating: in a row whose largest value is far above the rest, the small
values round to zero (a row with one value of 6.6e4 has a step of about 520). Per-row scales keep that
to the rows that hold such values; tests/test_int8.py measures what it costs.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from shared import archs
from shared.errors import ProfileError
from worker.engine import emulation
from worker.engine.fp8 import DIT_TARGETS, TEXT_ENCODER_TARGETS, targets_for

__all__ = [
    "DIT_TARGETS",
    "INT8_MAX",
    "TEXT_ENCODER_TARGETS",
    "Int8Linear",
    "convert",
    "has_int8_matmul",
    "int8_mm",
    "quantize_rows",
    "quantize_weight",
]

INT8_MAX = 127.0  # symmetric: -128 is never used, so a value and its negation round alike
# An all-zero row (or weight channel) gets this scale rather than 0, which would make it 0/0 = NaN.
MIN_SCALE = 1e-12
# torch._int_mm on CUDA needs more than 16 rows, and inner and output sizes that are multiples of 8.
INT_MM_MIN_ROWS = 17
_ALIGN = 8
# Turing is the first architecture with int8 tensor cores (cuBLASLt IMMA).
INT8_MATMUL_CAPABILITY = (7, 5)


@torch.library.custom_op("zfarm::int8_mm", mutates_args=())
def int8_mm(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int8 rows (M, K) times an int8 weight (N, K), transposed: (M, N) int32, by `torch._int_mm`.

    An op of its own, so that torch.compile calls it as it is and never lowers the product itself:
    inductor times Triton int8 matmul templates against cuBLASLt for `aten._int_mm` on GPUs with 68 or
    more SMs, at compile time, and Triton cannot compile an int8 dot for sm_75 (RTX 2080 Ti, Titan RTX).
    The weight stays row-major, so `weight.t()` is a column-major second operand: with row-major rows
    first, the layout cuBLASLt's int8 kernels take on every card and CUDA release zfarm runs (sm_75 needs
    CUDA 12.3 or later for it; a row-major second operand fails on CUDA 13: torch's test__int_mm)."""
    return torch._int_mm(rows.contiguous(), weight.t())


@int8_mm.register_fake
def _int8_mm_shape(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return rows.new_empty((rows.shape[0], weight.shape[0]), dtype=torch.int32)


def has_int8_matmul(device) -> bool:
    """Whether `device` multiplies int8 x int8 -> int32 with `torch._int_mm`: CUDA GPUs of compute
    capability 7.5 or later (unless this process plays an architecture without it:
    `worker.engine.emulation`), and the CPU, whose kernel gives the same integers (slowly), so that CPU
    runs exercise the arithmetic a GPU does."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    emulated = emulation.active()
    if emulated is not None and not emulated.meets(archs.INT8_MATMUL):
        return False
    return torch.cuda.get_device_capability(device) >= INT8_MATMUL_CAPABILITY


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale of shape (out, 1)) with weight ~= int8 * scale, channel by channel,
    rounded to nearest."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp(min=MIN_SCALE)
    return torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, float32 scale of shape (rows, 1)) with rows ~= int8 * scale: the activation side of
    the int8 matmul, one scale per row so that one large token does not flatten the others."""
    x32 = rows.float()
    scale = (x32.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp(min=MIN_SCALE)
    return torch.round(x32 / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


class Int8Linear(torch.nn.Module):
    """A bias-optional Linear whose weight is int8 with per-output-channel float32 scales.

    `int8_matmul`: multiply in int8 (activations quantised per row at each call); otherwise the weight
    is dequantised to `compute_dtype` at each call (half the memory of bf16, bf16 arithmetic)."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype, int8_matmul: bool):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.compute_dtype = compute_dtype
        self.int8_matmul = int8_matmul
        # (out, in), row-major: the layout `int8_mm` needs.
        self.weight = torch.nn.Parameter(weight_int8.contiguous(), requires_grad=False)
        # (1, out): broadcasts over the (rows, out) product.
        self.weight_scale = torch.nn.Parameter(scale.reshape(1, -1).float().contiguous(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(compute_dtype),
                                                                 requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                    int8_matmul: bool) -> Int8Linear:
        """The layer for a float weight (out, in), quantised where the weight lies."""
        weight_int8, scale = quantize_weight(weight)
        return cls(weight_int8, scale, bias, compute_dtype, int8_matmul)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, compute_dtype: torch.dtype, int8_matmul: bool,
                    device=None) -> Int8Linear:
        """`linear` quantised on `device` (default: where its weight is)."""
        weight = linear.weight if device is None else linear.weight.to(device)
        bias = None if linear.bias is None else (linear.bias if device is None else linear.bias.to(device))
        return cls.from_weight(weight, bias, compute_dtype, int8_matmul)

    @classmethod
    def concat(cls, layers: list[Int8Linear]) -> Int8Linear:
        """One layer computing all of `layers` (same input) side by side on the output axis. Exact: each
        output channel keeps its own weight scale, and the input's row scales do not depend on the weight."""
        first = layers[0]
        biases = [layer.bias for layer in layers]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            raise ProfileError("cannot fuse layers where only some have a bias")
        bias = None if biases[0] is None else torch.cat([b.data for b in biases])
        return cls(torch.cat([layer.weight.data for layer in layers]),
                   torch.cat([layer.weight_scale.data for layer in layers], dim=1).reshape(-1, 1),
                   bias, first.compute_dtype, first.int8_matmul)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight in the compute dtype: int8 times scale in float32, rounded once."""
        return (self.weight.float() * self.weight_scale.t()).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if not self.int8_matmul or (rows.is_cuda and rows.shape[0] < INT_MM_MIN_ROWS):
            out = F.linear(rows.to(self.compute_dtype), self.dequantized_weight(), self.bias)
        else:
            x_int8, x_scale = quantize_rows(rows)
            # int32 sums: at most in_features * 127 * 127, exact below 133,000 inputs.
            acc = int8_mm(x_int8, self.weight)
            out = (acc.float() * x_scale * self.weight_scale).to(self.compute_dtype)
            if self.bias is not None:
                out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8_matmul={self.int8_matmul}")


def convertible(name: str, module: torch.nn.Module, pattern: re.Pattern) -> bool:
    """A target Linear layer (by name) whose sizes `torch._int_mm` takes on CUDA."""
    return (isinstance(module, torch.nn.Linear) and pattern.search(name) is not None
            and module.in_features % _ALIGN == 0 and module.out_features % _ALIGN == 0)


def convert(model: torch.nn.Module, compute_dtype: torch.dtype, int8_matmul: bool, work_device=None,
            out_device=None, pattern: re.Pattern | None = None) -> int:
    """Replace the model's target Linear layers with Int8Linear, one at a time.

    Each weight is quantised on `work_device` (the GPU: seconds for billions of weights, where the CPU
    takes minutes) and the int8 copy kept on `out_device` (default: the work device), so neither the
    GPU nor the host ever holds the whole model twice. Layers already converted are left as they are.
    Returns how many layers were converted."""
    pattern = pattern or targets_for(model)
    names = [name for name, module in model.named_modules() if convertible(name, module, pattern)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = Int8Linear.from_linear(getattr(parent, child), compute_dtype, int8_matmul, device=work_device)
        if out_device is not None:
            layer = layer.to(out_device)
        setattr(parent, child, layer)
    return len(names)
