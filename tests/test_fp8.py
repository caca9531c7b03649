"""Native fp8 layers (worker.engine.fp8) and the profiles built on them, on the CPU: scales, both compute
paths, which layers are converted, and a converted tiny pipeline still rendering."""
from __future__ import annotations

import pytest
import torch

from shared.errors import ProfileError
from worker.engine import fp8, pipeline, placement, specs


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def test_a_weight_is_stored_as_fp8_with_one_scale_per_output_channel_and_comes_back_within_four_percent():
    torch.manual_seed(0)
    # Rows of very different magnitude: a single scale for the whole tensor would crush the small ones.
    weight = torch.randn(64, 128) * torch.logspace(-4, 0, 64).unsqueeze(1)
    weight_fp8, scale = fp8.quantize_weight(weight)
    assert weight_fp8.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    restored = weight_fp8.float() * scale
    per_row = [relative_error(restored[i], weight[i]) for i in range(64)]
    assert max(per_row) < 0.04


@pytest.mark.parametrize("fp8_matmul", [False, True])
def test_an_fp8_linear_matches_the_bf16_linear_within_fp8_rounding(fp8_matmul):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512).to(torch.bfloat16)
    x = torch.randn(3, 7, 256, dtype=torch.bfloat16)
    layer = fp8.Fp8Linear.from_linear(linear, torch.bfloat16, fp8_matmul)
    out = layer(x)
    assert out.shape == (3, 7, 512) and out.dtype == torch.bfloat16
    # e4m3 keeps 3 mantissa bits: ~2.5% for the weight alone, ~3.6% with fp8 activations too.
    assert relative_error(out, linear(x)) < (0.05 if fp8_matmul else 0.035)


def test_fp8_tensors_are_frozen_parameters_so_that_group_offload_moves_them_back_to_the_host():
    layer = fp8.Fp8Linear.from_linear(torch.nn.Linear(32, 48), torch.bfloat16, False)
    params = dict(layer.named_parameters())
    assert set(params) == {"weight", "weight_scale", "bias"}
    assert not any(p.requires_grad for p in params.values())
    assert list(layer.buffers()) == []


def test_no_fp8_matmul_is_attempted_without_a_cuda_gpu():
    assert fp8.has_fp8_matmul("cpu") is False


def test_converting_the_dit_touches_only_its_block_projections_and_keeps_the_model_dtype(tiny_dir):
    pipe = pipeline.load_pipeline(str(tiny_dir), torch.bfloat16, device="cpu")
    converted = fp8.convert(pipe.transformer, torch.bfloat16, fp8_matmul=False)
    kinds = {name: type(m).__name__ for name, m in pipe.transformer.named_modules()}
    fp8_names = [n for n, k in kinds.items() if k == "Fp8Linear"]
    assert converted == len(fp8_names) > 0
    assert all(fp8.DIT_TARGETS.search(n) for n in fp8_names)
    # adaLN modulation, embedders and the final layer stay bf16 Linear layers.
    assert not any("adaLN_modulation" in n for n in fp8_names)
    assert kinds["t_embedder.mlp.0"] == "Linear"
    assert pipe.transformer.dtype == torch.bfloat16


def test_a_pipeline_with_both_models_converted_still_renders_the_requested_size(tiny_dir):
    pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")
    assert fp8.convert(pipe.text_encoder, torch.float32, fp8_matmul=False) > 0
    fp8.convert(pipe.transformer, torch.float32, fp8_matmul=False)
    assert pipe.text_encoder.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt="a red lantern on a bridge", height=256, width=192, num_inference_steps=2,
                 guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert image.size == (192, 256)


@pytest.mark.parametrize("name, expected", [
    ("resident", False), ("resident_compiled", False), ("fp8mm_compiled", True), ("te_fp8_resident", True),
    ("group_stream", False), ("group_stream_fp8", True), ("sequential", False), ("fp8mm_fast_compiled", True),
    ("fp8mm_stream", True)])
def test_a_profile_is_lossy_when_it_stores_or_multiplies_in_fp8(name, expected):
    assert specs.is_lossy(specs.spec_for(name)) is expected


def test_the_native_fp8_profiles_load_their_fp8_models_on_the_host_and_convert_on_the_gpu():
    # Only components kept in the load dtype are streamed straight onto the GPU.
    assert specs.gpu_components("fp8mm_compiled") == ("text_encoder", "vae")
    assert specs.gpu_components("fp8mm_both_compiled") == ("vae",)
    with pytest.raises(ProfileError, match="needs a CUDA GPU"):
        placement.apply_profile(object(), "fp8mm_compiled", "cpu")


def test_fast_accumulation_is_carried_into_every_converted_layer_and_its_fused_forms(tiny_dir):
    from worker.engine import fuse

    pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")
    fp8.convert(pipe.transformer, torch.float32, fp8_matmul=False, fast_accum=True)
    fuse.fuse_projections(pipe.transformer)
    layers = [m for m in pipe.transformer.modules() if isinstance(m, fp8.Fp8Linear)]
    assert layers and all(layer.fast_accum for layer in layers)
