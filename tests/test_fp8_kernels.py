"""The feed-forward gate kernel (worker.engine.kernels.silu_gate): its op's arithmetic on the CPU, the Triton kernel
itself in Triton's interpreter, how the fused feed-forward uses it, and the profile rules around it."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from bench import kernel_code
from tests.triton_interpreter import run_interpreted
from worker.engine import fp8, fuse, specs
from worker.engine.kernels import silu_gate


def gate_values(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    # Rows of very different sizes: each must get its own scale.
    return (torch.randn(rows, 2 * width) * torch.logspace(-2, 1, rows).unsqueeze(1)).to(torch.bfloat16)


def test_the_gate_op_on_the_cpu_is_silu_times_value_in_float32_scaled_row_by_row():
    gate_value = gate_values(9, 48)
    rows_fp8, scales = silu_gate.silu_gate_fp8(gate_value)
    gate, value = gate_value.float().chunk(2, dim=-1)
    expected_fp8, expected_scales = fp8.quantize_rows(F.silu(gate) * value)
    assert rows_fp8.dtype == fp8.FP8_DTYPE and rows_fp8.shape == (9, 48) and scales.shape == (9, 1)
    assert torch.equal(rows_fp8.view(torch.uint8), expected_fp8.view(torch.uint8))
    assert torch.equal(scales, expected_scales)
    # and the rows come back within fp8 rounding of the bf16 gate the unfused block computes
    bf16_gate = (F.silu(gate_value[:, :48]) * gate_value[:, 48:]).float()
    restored = rows_fp8.float() * scales
    assert ((restored - bf16_gate).norm(dim=1) / bf16_gate.norm(dim=1)).max() < 0.04


def test_the_gate_op_refuses_rows_that_do_not_split_into_gate_and_value():
    with pytest.raises(ValueError, match=r"\(rows, 2 \* width\), got \(4, 7\)"):
        silu_gate.silu_gate_fp8(torch.zeros(4, 7))


def test_the_gate_op_traces_into_one_graph_with_the_shapes_of_its_outputs():
    gate_value = gate_values(5, 32)
    compiled = torch.compile(silu_gate.silu_gate_fp8, fullgraph=True, backend="aot_eager")
    rows_fp8, scales = compiled(gate_value)
    expected_fp8, expected_scales = silu_gate.reference(gate_value)
    assert torch.equal(rows_fp8.view(torch.uint8), expected_fp8.view(torch.uint8))
    assert torch.equal(scales, expected_scales)


def _fp8_feed_forward(gate_kernel: bool, fp8_matmul: bool = True) -> fuse.GatedFeedForward:
    torch.manual_seed(1)
    w1, w3 = (torch.nn.Linear(64, 96, bias=False).to(torch.bfloat16) for _ in range(2))
    w2 = torch.nn.Linear(96, 64, bias=False).to(torch.bfloat16)
    layers = [fp8.Fp8Linear.from_linear(layer, torch.bfloat16, fp8_matmul) for layer in (w1, w3, w2)]
    return fuse.GatedFeedForward(fuse.concat_linears(layers[:2]), layers[2], gate_kernel=gate_kernel)


def test_a_feed_forward_with_the_gate_kernel_matches_the_plain_one_within_fp8_rounding():
    x = torch.randn(2, 11, 64, dtype=torch.bfloat16)
    with_kernel, plain = _fp8_feed_forward(True), _fp8_feed_forward(False)
    assert with_kernel.gate_kernel and not plain.gate_kernel
    out, expected = with_kernel(x), plain(x)
    assert out.shape == (2, 11, 64) and out.dtype == torch.bfloat16
    # The plain block rounds silu(gate) * value to bf16 before scaling it; the kernel keeps float32.
    assert ((out.float() - expected.float()).norm() / expected.float().norm()).item() < 0.03
    # Exactly the op's rows fed to w2's fp8 matmul:
    gate_value = with_kernel.w13(x).reshape(-1, 192)
    assert torch.equal(out.reshape(-1, 64), with_kernel.w2.matmul_fp8(*silu_gate.reference(gate_value)))


def test_the_gate_kernel_stays_off_where_w2_does_not_run_an_fp8_matmul():
    assert not _fp8_feed_forward(True, fp8_matmul=False).gate_kernel
    linear = torch.nn.Linear(8, 16)
    assert not fuse.GatedFeedForward(fuse.concat_linears([linear, linear]), torch.nn.Linear(16, 8),
                                     gate_kernel=True).gate_kernel


def test_a_profile_asking_for_the_gate_kernel_without_fused_native_fp8_is_refused():
    with pytest.raises(ValueError, match="gate_kernel .* needs transformer fp8mm\\* and fuse_projections"):
        specs.spec_for("fp8mm_compiled", {"gate_kernel": True})
    with pytest.raises(ValueError, match="gate_kernel"):
        specs.spec_for("resident_compiled", {"gate_kernel": True, "fuse_projections": True})
    assert specs.spec_for("fp8mm_fast_gate_compiled").gate_kernel


def test_the_triton_kernel_in_triton_s_interpreter_scales_each_row_as_the_reference_does():
    # Triton's interpreter runs the kernel on the CPU (with numpy). Its fp8 rounding is not the GPU's
    # (values that round up to a power of two come out halved), so the kernel writes its scaled rows
    # unrounded here; the GPU's rounding is compared in bench.kernels (fp8_equal).
    script = textwrap.dedent("""
        import json, torch, torch.nn.functional as F
        from worker.engine import fp8
        from worker.engine.kernels import silu_gate
        torch.manual_seed(0)
        out = {}
        for rows, width in ((7, 80), (3, 128), (2, 10)):  # row widths below, at and far below the block
            gate_value = (torch.randn(rows, 2 * width) * 3).to(torch.bfloat16)
            gate_value[-1] = 0  # a row of zeros keeps the smallest scale and scales to zeros
            scaled, scales = silu_gate.run_kernel(gate_value, out_dtype=torch.float32)
            gate, value = gate_value.float().chunk(2, dim=-1)
            gated = F.silu(gate) * value
            expected_scales = (gated.abs().amax(1, keepdim=True) / fp8.FP8_MAX).clamp(min=fp8.MIN_SCALE)
            expected = (gated / expected_scales).clamp(-fp8.FP8_MAX, fp8.FP8_MAX)
            out[f"{rows}x{width}"] = {
                "shape": list(scaled.shape),
                "scale_err": ((scales - expected_scales).abs() / expected_scales).max().item(),
                "value_err": (scaled - expected).abs().max().item(),
                "row_max": scaled[:-1].abs().amax(1).min().item(),
                "zero_row": scaled[-1].abs().max().item(), "zero_scale": scales[-1].item()}
        print(json.dumps(out))
    """)
    results = run_interpreted(script)
    for (rows, width), name in zip(((7, 80), (3, 128), (2, 10)), results):
        got = results[name]
        assert got["shape"] == [rows, width]
        assert got["scale_err"] < 1e-6 and got["value_err"] < 1e-3, (name, got)
        assert got["zero_row"] == 0.0 and got["zero_scale"] == pytest.approx(fp8.MIN_SCALE)
        # each non-zero row's largest value lands on fp8's largest
        assert got["row_max"] == pytest.approx(fp8.FP8_MAX, rel=1e-6)


@pytest.mark.parametrize("num_warps", [silu_gate.NUM_WARPS, 32])
def test_the_gate_kernel_compiles_for_an_h100_reading_its_rows_in_16_byte_loads(num_warps):
    # The DiT's rows (10240 gates and values) at the default warps and at the most gate_warps may ask for.
    loads = {kind for kind in kernel_code.global_accesses(kernel_code.compile_for_h100("gate", num_warps)["ptx"])
             if kind.startswith("ld.")}
    assert loads == {"ld.global.v4.b32"}, loads


def test_a_feed_forward_compiled_in_the_persistent_mode_runs_the_gate_op_inside_its_one_graph():
    from worker.engine import compile_modes

    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    feed_forward = _fp8_feed_forward(True)
    eager = feed_forward(x)
    calls = []
    original = silu_gate.reference

    def counted(gate_value):
        calls.append(tuple(gate_value.shape))
        return original(gate_value)

    # fullgraph: a graph break around the op would raise instead of splitting the block
    compiled = torch.compile(feed_forward, fullgraph=True, **compile_modes.block_compile_args("persistent"))
    try:
        silu_gate.reference = counted
        out = compiled(x)
    finally:
        silu_gate.reference = original
        torch._dynamo.reset()
    assert calls == [(15, 192)]  # the op ran once, on the fused w1/w3 output's rows
    assert ((out.float() - eager.float()).norm() / eager.float().norm()).item() < 0.01
