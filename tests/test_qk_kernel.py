"""The q/k norm + rotary kernel (worker.engine.kernels.qk_norm_rope): its op's arithmetic on the CPU against diffusers'
own norm and rotation, the Triton kernel in Triton's interpreter, the fused processor that calls it,
and the profile rules around it."""
from __future__ import annotations

import textwrap

import pytest
import torch
from diffusers.models.normalization import RMSNorm

from bench import kernel_code
from tests.test_fuse import tiny_image
from tests.triton_interpreter import run_interpreted
from worker.engine import fuse, pipeline, rope, specs
from worker.engine.kernels import qk_norm_rope


def qk_inputs(batch=2, tokens=9, heads=3, head_dim=16, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    qkv = (torch.randn(batch, tokens, 3 * heads * head_dim) * 3).to(dtype)
    q_norm, k_norm = RMSNorm(head_dim, eps=1e-5), RMSNorm(head_dim, eps=1e-5)
    with torch.no_grad():
        for norm in (q_norm, k_norm):
            norm.weight.copy_(1 + 0.2 * torch.randn(head_dim))
    q_norm.to(dtype), k_norm.to(dtype)
    freqs_cis = torch.polar(torch.ones(batch, tokens, head_dim // 2), torch.rand(batch, tokens, head_dim // 2) * 50)
    return qkv, q_norm, k_norm, freqs_cis


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_qk_op_on_the_cpu_is_diffusers_norm_and_rotation_of_each_head_exactly(dtype):
    qkv, q_norm, k_norm, freqs_cis = qk_inputs(dtype=dtype)
    out = qk_norm_rope.qk_norm_rope(qkv, q_norm.weight, k_norm.weight, torch.view_as_real(freqs_cis), 3, 1e-5)
    query, key, _ = (part.unflatten(-1, (3, -1)) for part in qkv.chunk(3, dim=-1))
    with torch.no_grad():
        expected = [rope.apply_rotary_emb(q_norm(query), freqs_cis), rope.apply_rotary_emb(k_norm(key), freqs_cis)]
    assert out.shape == (2, 2, 9, 3, 16) and out.dtype == dtype
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])


def test_the_qk_op_refuses_inputs_that_do_not_split_into_heads_or_rotations_of_their_size():
    qkv, q_norm, k_norm, freqs_cis = qk_inputs()
    real = torch.view_as_real(freqs_cis)
    with pytest.raises(ValueError, match=r"3 \* heads \* head_dim\) with 5 heads, got \(2, 9, 144\)"):
        qk_norm_rope.qk_norm_rope(qkv, q_norm.weight, k_norm.weight, real, 5, 1e-5)
    with pytest.raises(ValueError, match=r"rope as \(batch, tokens, 8, 2\), got \(2, 9, 4, 2\)"):
        qk_norm_rope.qk_norm_rope(qkv, q_norm.weight, k_norm.weight, real[:, :, :4], 3, 1e-5)


@pytest.mark.parametrize("op", ["qk_norm_rope", "qk_norm_rope_inline"])
def test_each_qk_op_traces_into_one_graph_with_the_shape_and_dtype_of_its_output(op):
    qkv, q_norm, k_norm, freqs_cis = qk_inputs()
    args = (qkv, q_norm.weight.detach(), k_norm.weight.detach(), torch.view_as_real(freqs_cis), 3, 1e-5)
    compiled = torch.compile(getattr(qk_norm_rope, op), fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    torch._dynamo.reset()
    assert torch.equal(out, qk_norm_rope.reference(*args))


def test_the_triton_kernel_in_triton_s_interpreter_normalises_and_rotates_each_head_as_the_reference_does():
    # Triton's interpreter rounds float32 to bf16 by truncation, not to nearest as the GPU does, and
    # its bf16 arithmetic is wrong; the kernel computes in float32 and writes float32 here, so each of
    # its two intermediate roundings may land one bf16 step off the reference's (bench.kernels
    # compares the GPU's results value for value).
    script = textwrap.dedent("""
        import json, torch
        from worker.engine.kernels import qk_norm_rope
        torch.manual_seed(0)
        out = {}
        for batch, tokens, heads, head_dim in ((2, 5, 3, 16), (1, 4, 5, 8)):  # heads below and at a power of two
            qkv = (torch.randn(batch, tokens, 3 * heads * head_dim) * 3).to(torch.bfloat16)
            weights = (1 + 0.2 * torch.randn(2, head_dim)).to(torch.bfloat16)
            angles = torch.rand(batch, tokens, head_dim // 2) * 50
            rope = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))
            args = (qkv, weights[0], weights[1], rope, heads, 1e-5)
            got = qk_norm_rope.run_kernel(*args, out_dtype=torch.float32)
            expected = qk_norm_rope.reference(*args).float()
            swapped = qk_norm_rope.reference(qkv, weights[1], weights[0], rope, heads, 1e-5).float()
            out[f"{heads}x{head_dim}"] = {
                "shape": list(got.shape),
                "max_err": ((got - expected).abs().max() / expected.abs().max()).item(),
                "swapped_err": ((got - swapped).abs().max() / swapped.abs().max()).item()}
        print(json.dumps(out))
    """)
    results = run_interpreted(script)
    assert results["3x16"]["shape"] == [2, 2, 5, 3, 16] and results["5x8"]["shape"] == [2, 1, 4, 5, 8]
    for name, got in results.items():
        assert got["max_err"] < 0.02, (name, got)  # two bf16 steps (1/128 each) of the largest value
        assert got["swapped_err"] > 0.05, (name, got)  # q's weight applied to q, k's to k


def test_the_qk_kernel_compiles_for_an_h100_reading_and_writing_whole_rows_in_16_byte_accesses():
    # Z-Image's 30 heads of 128 at the kernel's own warps. A first version's strided 2-byte loads ran it
    # at a seventh of the card's bandwidth; this pins the compiled code to wide loads and stores only.
    asm = kernel_code.compile_for_h100("qk")
    accesses = kernel_code.global_accesses(asm["ptx"])
    assert set(accesses) == {"ld.global.v4.b32", "st.global.v4.b32"}, accesses
    assert kernel_code.sass_summary(asm["cubin"])["shared_memory"] is False


def test_a_fused_tiny_pipeline_with_the_qk_kernel_draws_the_image_of_the_norms_and_rotation(tiny_dir):
    images = []
    for qk in (False, True):
        pipe = pipeline.load_pipeline(str(tiny_dir), torch.bfloat16, device="cpu")
        fuse.fuse_projections(pipe.transformer, real_rope=True, qk_kernel=qk, triton_ops=qk)
        assert pipe.transformer.layers[0].attention.processor.qk_kernel is qk
        images.append(tiny_image(pipe))
    assert torch.equal(images[0], images[1])


def test_the_qk_kernel_is_left_off_an_attention_whose_norms_it_does_not_compute():
    attn = type("Attention", (), {})()
    attn.norm_q, attn.norm_k = RMSNorm(8, eps=1e-5), RMSNorm(8, eps=1e-6)
    assert not fuse.qk_kernel_fits(attn)  # two epsilons
    attn.norm_k = RMSNorm(8, eps=1e-5)
    assert fuse.qk_kernel_fits(attn)
    attn.norm_k = RMSNorm(8, eps=1e-5, elementwise_affine=False)
    assert not fuse.qk_kernel_fits(attn)
    attn.norm_k = torch.nn.LayerNorm(8, eps=1e-5)
    assert not fuse.qk_kernel_fits(attn)


def test_profiles_asking_for_the_qk_kernel_or_triton_ops_without_what_they_change_are_refused():
    with pytest.raises(ValueError, match="qk_kernel .* needs fuse_projections"):
        specs.spec_for("fp8mm_compiled", {"qk_kernel": True})
    with pytest.raises(ValueError, match="triton_ops .* needs gate_kernel or qk_kernel"):
        specs.spec_for("fp8mm_fast_compiled", {"triton_ops": True})
    with pytest.raises(ValueError, match="gate_warps is the gate kernel's"):
        specs.spec_for("fp8mm_fast_compiled", {"gate_warps": 32})
    with pytest.raises(ValueError, match="gate_warps must be 0 or a power of two"):
        specs.spec_for("fp8mm_fast_gate_compiled", {"gate_warps": 12})
    spec = specs.spec_for("fp8mm_fast_gate_compiled", {"qk_kernel": True, "triton_ops": True, "gate_warps": 32})
    assert spec.qk_kernel and spec.triton_ops and spec.gate_warps == 32
