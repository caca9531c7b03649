"""Native int8 layers (worker.engine.int8) and the profiles built on them, on the CPU: the weight and row
scales, the error of both compute paths against float64, zero rows and outliers, exact fusion, compilation,
which layers are converted, no fp8 type anywhere on the int8 path, and a tiny pipeline rendering with them.

torch._int_mm runs on the CPU with the integers a GPU's int8 tensor cores give, so the int8 arithmetic
tested here is the GPU's; only CUDA's small-row fallback (fewer than 17 rows) cannot run here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shared import archs
from shared.errors import ProfileError
from worker.engine import fp8, fuse, int8, pipeline, placement, specs

INT8_PROFILES = [name for name, spec in specs.SPECS.items()
                 if any(p.startswith("int8mm") for p in (spec.transformer, spec.text_encoder))]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def dit_inputs(transformer, seed: int = 0) -> tuple:
    """Fixed random latents, timestep and caption features of the tiny DiT's sizes."""
    g = torch.Generator("cpu").manual_seed(seed)
    latents = [torch.randn(transformer.config.in_channels, 1, 16, 16, generator=g)]
    caption = [torch.randn(24, transformer.config.cap_feat_dim, generator=g)]
    return latents, torch.tensor([0.5]), caption


def dit_output(transformer) -> torch.Tensor:
    with torch.no_grad():
        out = transformer(*dit_inputs(transformer), return_dict=False)[0]
    return torch.stack([o.float() for o in out])


def linear_with(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def test_a_weight_is_stored_as_int8_with_one_scale_per_output_channel_and_comes_back_within_half_a_step():
    torch.manual_seed(0)
    # Rows of very different magnitude: one scale for the whole tensor would crush the small ones.
    weight = torch.randn(64, 128) * torch.logspace(-4, 0, 64).unsqueeze(1)
    weight_int8, scale = int8.quantize_weight(weight)
    assert weight_int8.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (64, 1)
    assert weight_int8.abs().max().item() == 127
    restored = weight_int8.float() * scale
    assert ((restored - weight).abs() <= scale / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8_matmul, bound", [(True, 0.016), (False, 0.012)])
def test_an_int8_linear_matches_the_float_product_within_int8_rounding(dtype, int8_matmul, bound):
    torch.manual_seed(0)
    weight, bias = torch.randn(384, 512) / 512 ** 0.5, torch.randn(384) * 0.1
    x = torch.randn(3, 70, 512)
    layer = int8.Int8Linear.from_linear(linear_with(weight, bias).to(dtype), dtype, int8_matmul)
    out = layer(x.to(dtype))
    assert out.shape == (3, 70, 384) and out.dtype == dtype
    # Rounding both operands to 8 bits: ~1.2% for normal activations (~0.9% for the weight alone), where
    # bf16 alone is ~0.3%. Figures at the DiT's 3840 width are in docs/performance.md.
    assert relative_error(out, x.double() @ weight.double().t() + bias.double()) < bound


def test_rows_holding_a_6_6e4_value_stay_within_int8_error_and_leave_the_other_rows_exactly_as_they_were():
    """Z-Image's MLP inputs reach 6.6e4. With one scale per row, such a row costs only itself: its small
    values round to zero (a step of ~520), the product stays within int8 error because the large value
    dominates it, and every other row computes what it would alone."""
    torch.manual_seed(0)
    weight = torch.randn(256, 512) / 512 ** 0.5
    x = torch.randn(64, 512)
    spiked = x.clone()
    spiked[:8, 7] = 6.6e4
    layer = int8.Int8Linear.from_linear(linear_with(weight), torch.float32, True)
    out = layer(spiked)
    assert torch.isfinite(out).all()
    assert relative_error(out, spiked.double() @ weight.double().t()) < 0.015
    assert torch.equal(out[8:], layer(x[8:]))
    rows_int8, row_scale = int8.quantize_rows(spiked[:8])
    assert (rows_int8[:, 8:] == 0).all() and row_scale.min().item() > 500


def test_channels_at_6_6e4_in_every_row_stay_within_int8_error_of_the_float_product():
    torch.manual_seed(1)
    weight = torch.randn(256, 512) / 512 ** 0.5
    x = torch.randn(64, 512)
    x[:, [3, 100, 400]] = 6.6e4 * torch.sign(torch.randn(64, 3))
    layer = int8.Int8Linear.from_linear(linear_with(weight), torch.float32, True)
    assert relative_error(layer(x), x.double() @ weight.double().t()) < 0.015


@pytest.mark.parametrize("int8_matmul", [True, False])
def test_all_zero_rows_give_the_bias_and_an_all_zero_weight_channel_gives_zeros_never_nan(int8_matmul):
    torch.manual_seed(0)
    weight, bias = torch.randn(64, 128), torch.randn(64)
    weight[:5] = 0
    x = torch.randn(40, 128)
    x[:7] = 0
    layer = int8.Int8Linear.from_linear(linear_with(weight, bias), torch.float32, int8_matmul)
    out = layer(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:7], bias.expand(7, -1))
    assert torch.equal(out[7:, :5], bias[:5].expand(33, -1))
    _, row_scale = int8.quantize_rows(torch.zeros(3, 16))
    assert (row_scale == int8.MIN_SCALE).all()


def test_a_strided_input_is_multiplied_as_its_contiguous_copy_with_the_weight_laid_out_for_cublaslt():
    torch.manual_seed(0)
    layer = int8.Int8Linear.from_linear(torch.nn.Linear(64, 48), torch.float32, True)
    x = torch.randn(64, 40).t()  # rows with a stride: cuBLASLt refuses a transposed first operand
    assert not x.is_contiguous()
    assert torch.equal(layer(x), layer(x.contiguous()))
    assert layer.weight.is_contiguous() and layer.weight.t().stride() == (1, 64)


def test_int8_tensors_are_frozen_parameters_so_that_group_offload_moves_them_back_to_the_host():
    layer = int8.Int8Linear.from_linear(torch.nn.Linear(32, 48), torch.bfloat16, True)
    params = dict(layer.named_parameters())
    assert set(params) == {"weight", "weight_scale", "bias"}
    assert params["weight"].dtype == torch.int8 and params["weight_scale"].dtype == torch.float32
    assert params["bias"].dtype == torch.bfloat16
    assert not any(p.requires_grad for p in params.values()) and list(layer.buffers()) == []


@pytest.mark.parametrize("bias", [True, False])
def test_concatenated_int8_layers_compute_exactly_what_the_layers_compute_side_by_side(bias):
    torch.manual_seed(0)
    layers = [int8.Int8Linear.from_linear(torch.nn.Linear(96, n, bias=bias), torch.float32, True) for n in (32, 64, 40)]
    fused = fuse.concat_linears(layers)
    assert isinstance(fused, int8.Int8Linear) and fused.out_features == 136
    assert fused.weight_scale.shape == (1, 136)
    x = torch.randn(2, 33, 96)
    assert torch.equal(fused(x), torch.cat([layer(x) for layer in layers], dim=-1))


def test_int8_layers_with_and_without_a_bias_are_refused_rather_than_fused():
    layers = [int8.Int8Linear.from_linear(torch.nn.Linear(16, 8, bias=b), torch.float32, True) for b in (True, False)]
    with pytest.raises(ProfileError, match="only some have a bias"):
        int8.Int8Linear.concat(layers)


def test_torch_compile_traces_an_int8_linear_as_one_graph_and_computes_the_eager_numbers():
    torch.manual_seed(0)
    layer = int8.Int8Linear.from_linear(torch.nn.Linear(256, 128), torch.float32, True)
    x = torch.randn(2, 40, 256)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, fullgraph=True)
        out = compiled(x)
    finally:
        torch._dynamo.reset()
    assert relative_error(out, layer(x)) < 1e-3


def _aten_graphs(fn, *args) -> list:
    """The aten graphs (after AOT autograd) torch.compile makes of `fn`, graph breaks allowed."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(fn, backend=aot_autograd(fw_compiler=keep))(*args)
    finally:
        torch._dynamo.reset()
    return graphs


def _dtypes(graphs) -> set:
    out = set()
    for graph_module in graphs:
        for node in graph_module.graph.nodes:
            values = node.meta.get("val")
            for value in values if isinstance(values, (tuple, list)) else (values,):
                if isinstance(value, torch.Tensor):
                    out.add(value.dtype)
    return out


FP8_TYPES = {torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz}


def test_the_compiled_int8_dit_has_no_fp8_type_anywhere_so_triton_below_sm_89_can_compile_it(tiny_dir):
    """Triton refuses e4m3 below sm_89; every tensor in the graphs inductor would generate code for, the
    int8 DiT's as the fused int8 profiles run it, is int8, int32, float or complex, and the int8 matmul
    is left to cuBLASLt."""
    pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")
    spec = specs.spec_for("int8mm_fast_compiled")
    placement.convert_weights(pipe.transformer, spec.transformer, "cpu", torch.float32, spec)
    graphs = _aten_graphs(pipe.transformer, *dit_inputs(pipe.transformer))
    ops = {str(node.target) for g in graphs for node in g.graph.nodes if node.op == "call_function"}
    # The matmul reaches inductor as zfarm's op, which it calls as is: never as aten._int_mm, for which it
    # would also try Triton int8 matmul templates (Triton has no int8 dot for sm_75).
    assert "zfarm.int8_mm.default" in ops and "aten._int_mm.default" not in ops
    dtypes = _dtypes(graphs)
    assert torch.int8 in dtypes and not dtypes & FP8_TYPES


def test_converting_the_dit_touches_only_its_block_projections_and_keeps_the_model_dtype(tiny_dir):
    pipe = pipeline.load_pipeline(str(tiny_dir), torch.bfloat16, device="cpu")
    converted = int8.convert(pipe.transformer, torch.bfloat16, int8_matmul=True)
    kinds = {name: type(m).__name__ for name, m in pipe.transformer.named_modules()}
    int8_names = [n for n, k in kinds.items() if k == "Int8Linear"]
    assert converted == len(int8_names) > 0
    assert all(fp8.DIT_TARGETS.search(n) for n in int8_names)
    assert int8.DIT_TARGETS is fp8.DIT_TARGETS and int8.TEXT_ENCODER_TARGETS is fp8.TEXT_ENCODER_TARGETS
    # adaLN modulation, embedders and the final layer stay bf16 Linear layers.
    assert not any("adaLN_modulation" in n for n in int8_names)
    assert kinds["t_embedder.mlp.0"] == "Linear" and kinds["all_final_layer.2-1.linear"] == "Linear"
    assert pipe.transformer.dtype == torch.bfloat16
    assert int8.convert(pipe.transformer, torch.bfloat16, int8_matmul=True) == 0  # nothing left to convert


def test_fusing_int8_layers_keeps_each_channels_scale_so_the_dit_output_is_unchanged(tiny_dir):
    pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")
    int8.convert(pipe.transformer, torch.float32, int8_matmul=True)
    before = dit_output(pipe.transformer)
    fuse.fuse_projections(pipe.transformer, real_rope=True)
    qkv = pipe.transformer.layers[0].attention.to_qkv
    assert isinstance(qkv, int8.Int8Linear) and qkv.weight.dtype == torch.int8
    assert relative_error(dit_output(pipe.transformer), before) < 1e-6


def tiny_image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a lighthouse at dusk", height=128, width=128, num_inference_steps=2, guidance_scale=0.0,
                generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]


def test_a_tiny_pipeline_with_the_int8_profiles_weights_renders_close_to_the_float_one(tiny_dir):
    reference = tiny_image(pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu"))
    name = "int8mm_both_fast_compiled"
    eager = {"compile": "", "vae_compile": False}  # compiling is tested above; this is about the numbers
    pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu",
                                  stream_loaded=specs.stream_loaded(name, eager))
    applied = placement.apply_profile(pipe, name, "cpu", eager, cpu_trial=True)
    assert applied.transformer == applied.text_encoder == "int8mm" and not applied.te_graph
    assert isinstance(pipe.transformer.layers[0].attention.to_qkv, int8.Int8Linear)
    assert isinstance(pipe.text_encoder.layers[0].self_attn.q_proj, int8.Int8Linear)
    image = tiny_image(pipe)
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()
    # The fidelity rule's threshold. Random tiny weights say nothing of what real weights will do.
    psnr = 10 * np.log10(1.0 / np.mean((image.astype(np.float64) - reference) ** 2))
    assert psnr > 40


def test_each_int8_profile_needs_int8_matmul_and_nothing_of_fp8():
    assert len(INT8_PROFILES) >= 5
    for name in INT8_PROFILES:
        spec = specs.spec_for(name)
        needs = specs.requirements(spec)
        assert archs.INT8_MATMUL in needs, name
        assert archs.TRITON_E4M3 not in needs and archs.FP8_MATMUL not in needs, name
        assert not (spec.gate_kernel or spec.fp8_fast_accum or spec.qk_kernel), name
        assert specs.is_lossy(spec), name
        assert "\n" not in spec.description and spec.description, name


@pytest.mark.parametrize("arch", ["sm_80", "sm_86"])
def test_an_ampere_card_meets_every_int8_profile(arch):
    caps = archs.capabilities(arch, "2.11.0+cu130", "3.6.0")
    for name in INT8_PROFILES:
        assert caps.missing(specs.requirements(specs.spec_for(name))) == [], name


def test_a_turing_card_meets_only_the_float32_int8_profile():
    caps = archs.capabilities("sm_75", "2.11.0+cu130", "3.6.0")
    fits = [name for name in INT8_PROFILES if not caps.missing(specs.requirements(specs.spec_for(name)))]
    assert fits == ["int8mm_both_fp32_compiled"]
    spec = specs.spec_for("int8mm_both_fp32_compiled")
    assert spec.compute_dtype == "float32" and archs.BF16 not in specs.requirements(spec)
    assert archs.CUDNN_ATTENTION not in specs.requirements(spec)


def test_a_float32_profile_loads_in_float32_and_a_bf16_one_in_what_the_device_computes():
    assert pipeline.load_dtype(specs.spec_for("int8mm_both_fp32_compiled"), "cuda") == torch.float32
    assert pipeline.load_dtype(specs.spec_for("int8mm_both_fast_compiled"), "cpu") == torch.float32
    assert pipeline.load_dtype(specs.spec_for("int8mm_both_fast_compiled"), "cuda") == pipeline.default_dtype("cuda")


def test_an_unknown_compute_dtype_and_cudnn_attention_in_float32_are_refused_when_defined():
    with pytest.raises(ProfileError, match="unknown compute dtype 'fp16'"):
        specs.spec_for("int8mm_fast_compiled", {"compute_dtype": "fp16"})
    with pytest.raises(ProfileError, match="cudnn"):
        specs.spec_for("int8mm_fast_compiled", {"compute_dtype": "float32"})


def test_the_int8_components_load_in_their_stored_form_and_only_bf16_resident_ones_load_straight_to_the_gpu():
    assert specs.stream_loaded("int8mm_fast_compiled") == {"transformer": ("int8mm", "blocks")}
    assert specs.gpu_components("int8mm_fast_compiled") == ("text_encoder", "vae")
    assert specs.stream_loaded("int8mm_fast_stream_pinned_compiled") == {"transformer": ("int8mm_stream", "blocks"),
                                                                         "text_encoder": ("int8mm_stream", "blocks")}
    assert specs.gpu_components("int8mm_fast_stream_pinned_compiled") == ("vae",)
    assert specs.stream_loaded("fp8mm_fast_compiled") == {} and specs.stream_loaded("cpu") == {}


def test_a_streamed_profile_tried_on_the_cpu_keeps_its_weights_resident_and_says_what_it_left_out():
    spec, left_out = specs.on_cpu(specs.spec_for("int8mm_fast_stream_pinned_compiled"))
    assert spec.transformer == spec.text_encoder == "int8mm" and not spec.pinned_arena
    assert left_out == ["transformer=int8mm_stream", "text_encoder=int8mm_stream", "pinned_arena=True",
                        "record_stream=True"]
    assert spec.compile == "fullgraph" and spec.fuse_projections


def test_a_gpu_profile_is_still_refused_on_the_cpu_unless_tried_there_on_purpose(tiny_dir):
    with pytest.raises(ProfileError, match="needs a CUDA GPU"):
        placement.apply_profile(object(), "int8mm_fast_compiled", "cpu")


def test_a_streamed_int8_dit_compiles_beneath_the_offload_hooks_and_draws_the_eager_image(tiny_dir):
    """int8mm_stream's path on the CPU: loaded in int8 for the host, fused, its blocks compiled beneath
    diffusers' group-offload hooks (the CPU stands in for both ends: no CUDA stream here)."""
    from diffusers.hooks import apply_group_offloading

    pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu",
                                  stream_loaded={"transformer": ("int8mm_stream", "blocks")})
    spec = specs.spec_for("int8mm_fast_stream_pinned_compiled")
    placement.convert_weights(pipe.transformer, spec.transformer, "cpu", torch.float32, spec)
    assert isinstance(pipe.transformer.layers[0].attention.to_qkv, int8.Int8Linear)
    eager = tiny_image(pipe)
    torch._dynamo.reset()
    try:
        placement.compile_blocks_under_hooks(pipe.transformer)
        apply_group_offloading(pipe.transformer, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=spec.blocks_per_group)
        compiled = tiny_image(pipe)
    finally:
        torch._dynamo.reset()
    assert np.abs(compiled - eager).max() < 1e-3
