"""How a policy's layers (`worker.engine.policy`) become fp8: the shipped row-wise recipe, its emulation
where no fp8 matmul exists, and the naive per-tensor recipe kept as the quality gate's negative control.

  rowwise   `worker.engine.fp8.Fp8Linear`: fp8 weights with one scale per output channel; activations
            rounded to fp8 with one scale per row, floored (`fp8.MIN_SCALE`) so an all-zero row does not
            divide by zero; `torch._scaled_mm` on fp8 tensor cores, else weight-only (dequantised at call).
  rowwise, emulated  `EmulatedFp8Linear`: the same rounding of weights and activations, multiplied in
            float32 (the CPU's lossy profiles): what the fp8 matmul loses, shown where it cannot run.
  tensor    `PerTensorFp8Linear`: one scale for the whole weight and one for the whole activation tensor,
            no floor. One large token sets the scale of all the others, which then round to a few fp8
            levels or to zero, and an all-zero tensor divides by zero. Never in a shipped profile: it is
            what the gate must catch (unsloth#6772, #8008; docs/quality.md).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from worker.engine import fp8

SCALINGS = ("rowwise", "tensor")


def _dequantised(x_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x_fp8.float() * scale


class EmulatedFp8Linear(fp8.Fp8Linear):
    """An Fp8Linear whose fp8 matmul is emulated: input rows rounded to fp8 with their row scales
    (`fp8.quantize_rows`), multiplied in float32 by the dequantised fp8 weight, as `torch._scaled_mm`
    accumulates. Runs on any device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp8, x_scale = fp8.quantize_rows(x.reshape(-1, self.in_features))
        weight = _dequantised(self.weight, self.weight_scale.t())
        out = F.linear(_dequantised(x_fp8, x_scale), weight).to(self.compute_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_tensor(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 tensor, float32 scalar scale) with one scale for all of `t`, and no floor: zero in, NaN out."""
    t32 = t.float()
    scale = t32.abs().amax() / fp8.FP8_MAX
    return (t32 / scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8_DTYPE), scale


class PerTensorFp8Linear(torch.nn.Module):
    """A Linear with per-tensor fp8 weight and activation scales (the naive recipe): `torch._scaled_mm` with
    scalar scales on fp8 tensor cores (`fp8_matmul`), else emulated in float32 on the dequantised tensors."""

    def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype, fp8_matmul: bool = False, device=None):
        super().__init__()
        weight = linear.weight if device is None else linear.weight.to(device)
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.fp8_matmul = fp8_matmul
        weight_fp8, scale = quantize_tensor(weight.detach())
        self.weight = torch.nn.Parameter(weight_fp8, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale.reshape(1), requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(
            (bias if device is None else bias.to(device)).detach().to(compute_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp8, x_scale = quantize_tensor(x.reshape(-1, self.in_features))
        if x_fp8.is_cuda and self.fp8_matmul:
            out = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.reshape(()),
                                   out_dtype=self.compute_dtype)
        else:
            out = F.linear(_dequantised(x_fp8, x_scale), _dequantised(self.weight, self.weight_scale)).to(
                self.compute_dtype)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def convert(model: torch.nn.Module, pattern: re.Pattern, compute_dtype: torch.dtype, fp8_matmul: bool,
            scaling: str = "rowwise", emulate: bool = False, work_device=None, out_device=None,
            fast_accum: bool = False) -> int:
    """Quantise the Linear layers of `model` that `pattern` selects (a policy's, `worker.engine.policy.pattern`)
    with recipe `scaling`; `emulate` runs the row-wise recipe's fp8 matmul in float32 (CPU). Layers are
    replaced one at a time, as `fp8.convert` does. Returns how many were."""
    if scaling not in SCALINGS:
        raise ValueError(f"unknown fp8 scaling {scaling!r} (known: {', '.join(SCALINGS)})")
    if scaling == "rowwise" and not emulate:
        return fp8.convert(model, compute_dtype, fp8_matmul, work_device=work_device, out_device=out_device,
                           pattern=pattern, fast_accum=fast_accum)
    names = [name for name, module in model.named_modules() if fp8._convertible(name, module, pattern)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if scaling == "tensor":
            layer = PerTensorFp8Linear(linear, compute_dtype, fp8_matmul, device=work_device)
        else:
            layer = EmulatedFp8Linear.from_linear(linear, compute_dtype, False, device=work_device)
        setattr(parent, child, layer if out_device is None else layer.to(out_device))
    return len(names)
