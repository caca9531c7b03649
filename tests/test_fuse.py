"""Fused DiT projections (worker.engine.fuse), on the CPU: the fused model computes what the unfused one did,
in full precision and with native fp8 layers, and only Z-Image's block projections change."""
from __future__ import annotations

import pytest
import torch

from worker.engine import fp8, fuse, pipeline, specs


def dit_output(transformer, seed: int = 0) -> torch.Tensor:
    """One DiT forward on fixed random latents and caption features of the tiny model's sizes."""
    g = torch.Generator("cpu").manual_seed(seed)
    channels = transformer.config.in_channels
    cap_dim = transformer.config.cap_feat_dim
    latents = [torch.randn(channels, 1, 16, 16, generator=g)]
    caption = [torch.randn(7, cap_dim, generator=g)]
    with torch.no_grad():
        out = transformer(latents, torch.tensor([0.5]), caption, return_dict=False)[0]
    return torch.stack([o.float() for o in out])


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def test_fusing_the_projections_changes_no_output_of_the_full_precision_dit(tiny_dir):
    pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")
    before = dit_output(pipe.transformer)
    blocks = fuse.fuse_projections(pipe.transformer)
    names = {name for name, _ in pipe.transformer.named_modules()}
    assert blocks == sum(len(getattr(pipe.transformer, n)) for n in fuse.BLOCK_LISTS) > 0
    assert "layers.0.attention.to_qkv" in names and "layers.0.attention.to_q" not in names
    assert "layers.0.feed_forward.w13" in names and "layers.0.feed_forward.w1" not in names
    assert relative_error(dit_output(pipe.transformer), before) < 1e-5


def test_fusing_native_fp8_layers_keeps_each_channels_scale_so_the_output_is_unchanged(tiny_dir):
    pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")
    fp8.convert(pipe.transformer, torch.float32, fp8_matmul=False)
    before = dit_output(pipe.transformer)
    fuse.fuse_projections(pipe.transformer)
    qkv = pipe.transformer.layers[0].attention.to_qkv
    assert isinstance(qkv, fp8.Fp8Linear) and qkv.weight.dtype == fp8.FP8_DTYPE
    assert qkv.weight_scale.shape == (1, qkv.out_features)
    assert relative_error(dit_output(pipe.transformer), before) < 1e-5


def test_linear_layers_of_different_kinds_are_refused_rather_than_fused():
    plain = torch.nn.Linear(32, 16, bias=False)
    converted = fp8.Fp8Linear.from_linear(torch.nn.Linear(32, 16, bias=False), torch.float32, False)
    with pytest.raises(TypeError, match="cannot fuse"):
        fuse.concat_linears([plain, converted])


def test_a_fused_profile_with_layerwise_fp8_casting_is_refused_when_defined():
    with pytest.raises(ValueError, match="fuse_projections"):
        specs.spec_for("group_stream_fp8", {"fuse_projections": True})


def tiny_image(pipe) -> torch.Tensor:
    """A 128x128, 2-step render of the tiny pipeline with a fixed prompt and seed."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a lighthouse at dusk", height=128, width=128, num_inference_steps=2, guidance_scale=0.0,
               generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
    return torch.from_numpy(out)


def test_a_fused_tiny_pipeline_draws_the_same_image_as_the_unfused_one(tiny_dir):
    images = []
    for fused in (False, True):
        pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")
        if fused:
            fuse.fuse_projections(pipe.transformer)
        images.append(tiny_image(pipe))
    assert (images[0] - images[1]).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_in_real_arithmetic_gives_exactly_the_numbers_of_the_complex_rotation(dtype):
    g = torch.Generator("cpu").manual_seed(3)
    x = torch.randn(1, 96, 4, 32, generator=g).to(dtype)
    freqs_cis = torch.polar(torch.ones(1, 96, 16), torch.randn(1, 96, 16, generator=g) * 3)
    assert torch.equal(fuse._apply_rotary_emb_real(x, freqs_cis), fuse._apply_rotary_emb(x, freqs_cis))


def test_compiled_real_rope_leaves_no_complex_arithmetic_to_eager_kernels():
    """Inductor cannot generate code for complex numbers: the complex rotation compiles to eager calls
    (view_as_complex, a complex mul) around its kernels; the real one to kernels alone."""
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(1, 64, 4, 32, dtype=torch.bfloat16)
    freqs_cis = torch.polar(torch.ones(1, 64, 16), torch.randn(1, 64, 16))
    codes = {}
    for name, rotate in (("complex", fuse._apply_rotary_emb), ("real", fuse._apply_rotary_emb_real)):
        torch._dynamo.reset()
        _, (code, *_) = run_and_get_code(torch.compile(rotate, fullgraph=True), x, freqs_cis)
        codes[name] = code
    torch._dynamo.reset()
    assert "aten.view_as_complex" in codes["complex"] and "aten.mul" in codes["complex"]
    assert "aten.view_as_complex" not in codes["real"] and "aten.mul" not in codes["real"]


def test_real_rope_is_refused_without_the_fused_processor_that_applies_it():
    with pytest.raises(ValueError, match="real_rope"):
        specs.spec_for("fp8mm_compiled", {"real_rope": True})


def test_a_fused_tiny_pipeline_with_real_rope_draws_the_image_of_the_complex_rotation(tiny_dir):
    images = []
    for real_rope in (False, True):
        pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")
        fuse.fuse_projections(pipe.transformer, real_rope=real_rope)
        assert pipe.transformer.layers[0].attention.processor.rotate is (
            fuse._apply_rotary_emb_real if real_rope else fuse._apply_rotary_emb)
        images.append(tiny_image(pipe))
    assert torch.equal(images[0], images[1])
