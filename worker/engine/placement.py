"""How a profile (`worker.engine.specs`) is applied to a loaded ZImagePipeline.

Placement uses diffusers' own mechanisms: `apply_group_offloading` (block level, CUDA streams),
layerwise casting (float8_e4m3fn storage, bf16 compute), `compile_repeated_blocks` (regional
compilation of the DiT blocks), VAE tiling, `enable_model_cpu_offload` and
`enable_sequential_cpu_offload`, plus zfarm's native fp8 and int8 layers (`worker.engine.fp8`,
`worker.engine.int8`), fused projections (`worker.engine.fuse`) and the CUDA-graph text encoder
(`worker.engine.text_encoder`). int8 components arrive converted already: `load_stored` reads them from
the files in that form (`worker.engine.streamload`).
"""
from __future__ import annotations

import functools
import os

from shared.errors import ProfileError
from worker.engine.compile_modes import block_compile_args
from worker.engine.specs import RESIDENT, Spec, on_cpu, spec_for

# Tile side (pixels) of the tiled VAE decode used by the small-card profiles: a 1024x1024 decode
# otherwise needs ~2 GiB of activations on top of the resident weights, at the very end of a job.
VAE_TILE_PX = 512
# Pinned host blocks above this size (MB) are allocated at their size, not the next power of two.
# Small ones keep the rounding, which lets torch reuse them for the pipeline's small transfers.
PINNED_ROUND_MAX_MB = 1


def _device_type(device) -> str:
    return device.type if hasattr(device, "type") else str(device).split(":")[0]


def convert_weights(module, placement: str, device, compute_dtype, spec: Spec, host="cpu") -> None:
    """Give `module` the weight form its placement stores (native fp8, layerwise fp8, or as loaded) and
    fuse a DiT's projections if the spec says so. Converted weights end on `device` for a resident
    placement, else on `host`. With `device` and `host` "meta" nothing is allocated: `bench/pinned.py`
    sizes a profile's streamed weights that way."""
    import torch
    from diffusers.hooks import apply_layerwise_casting

    from worker.engine import policy

    is_dit = hasattr(module, "noise_refiner")
    if placement.startswith("int8mm"):
        from worker.engine import int8

        # int8 matmuls only in the DiT, as for fp8: the text encoder runs once per prompt, and its weights
        # dequantised keep its activations exact. A component loaded by `load_stored` has nothing left to convert.
        int8.convert(module, compute_dtype, int8.has_int8_matmul(device) and is_dit, work_device=device,
                     out_device=device if placement in RESIDENT else host,
                     pattern=policy.pattern(module, spec.quant_policy))
    elif placement.startswith("fp8mm"):
        from worker.engine import fp8, fp8_recipes

        # fp8 matmuls only in the DiT, where the compute is: the text encoder runs once per image on one
        # 512-token prompt, so rounding its activations to fp8 too would buy nothing measurable. On a CPU
        # the DiT's fp8 matmuls are emulated, so that the CPU's lossy profiles lose what a GPU's would.
        fp8_matmul = fp8.has_fp8_matmul(device) and is_dit
        fp8_recipes.convert(module, policy.pattern(module, spec.quant_policy), compute_dtype, fp8_matmul,
                            scaling=spec.fp8_scaling, emulate=is_dit and _device_type(device) == "cpu",
                            work_device=device, out_device=device if placement in RESIDENT else host,
                            fast_accum=spec.fp8_fast_accum)
    elif placement.startswith("fp8") and policy.quantises_anything(spec.quant_policy):
        # Cast on the host, before the move: the bf16 weights would not fit beside the rest on a small card.
        apply_layerwise_casting(module, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                                skip_modules_pattern=_skip_patterns(module)
                                + policy.kept_patterns(module, spec.quant_policy))
    if is_dit and spec.fuse_projections:
        _fuse(module, spec)


def load_stored(folder: str, component: str, placement: str, dtype, device, host="cpu", quant_policy: str = ""):
    """Component `component` of the pipeline in `folder`, read from its files one tensor at a time into the
    form `placement` stores (int8mm*: its target layers quantised on `device` as `convert_weights` would),
    the rest in `dtype`; on `device` for a resident placement, else on `host`. Neither the host nor the GPU
    holds the component in `dtype` whole (`worker.engine.streamload`)."""
    import torch

    from worker.engine import int8, pipeline, policy, streamload

    if not placement.startswith("int8mm"):
        raise ProfileError(f"placement {placement!r} is not loaded tensor by tensor (only int8mm ones are)")
    model = pipeline.empty_component(folder, component, dtype)
    int8_matmul = int8.has_int8_matmul(device) and hasattr(model, "noise_refiner")
    out_device = torch.device(device if placement in RESIDENT else host)
    pattern = policy.pattern(model, quant_policy or policy.DEFAULT)
    targets = [name for name, module in model.named_modules() if int8.convertible(name, module, pattern)]

    def quantised(weight, bias):
        return int8.Int8Linear.from_weight(weight, bias, dtype, int8_matmul).to(out_device)

    files = streamload.checkpoint_files(os.path.join(folder, component))
    return streamload.load_into(model, files, dtype, out_device, convert=quantised, targets=targets,
                                work_device=device)


def pin_at_exact_sizes() -> None:
    """Make torch's pinned host allocator give large blocks their exact size.

    It rounds every block up to a power of two (pytorch/pytorch#150517), and diffusers' group offload
    pins each streamed tensor on its own, which costs host RAM (`bench/pinned.py`). Process-wide. A torch
    that refuses the setting raises ProfileError naming its version; one with no allocator-settings call
    at all raises RuntimeError."""
    import torch

    setting = f"pinned_max_round_threshold_mb:{PINNED_ROUND_MAX_MB}"
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        raise RuntimeError(f"pinned_exact: torch {torch.__version__} has no allocator settings call to set {setting}")
    # The call takes the whole settings string: what was set before (the worker's expandable_segments)
    # goes in again, or torch would be told the setting alone.
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    current = getter() if getter else os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if setting not in current.split(","):
        try:
            setter(f"{current},{setting}" if current else setting)
        except (ValueError, RuntimeError) as exc:
            raise ProfileError(f"pinned_exact: torch {torch.__version__} does not take the allocator setting "
                               f"{setting} ({exc})") from exc


def _place(module, placement: str, device, compute_dtype, spec: Spec) -> None:
    import torch
    from diffusers.hooks import apply_group_offloading

    is_dit = hasattr(module, "noise_refiner")
    convert_weights(module, placement, device, compute_dtype, spec)
    if placement in RESIDENT:
        module.to(device)
        return
    if spec.pinned_exact:
        pin_at_exact_sizes()
    if spec.pinned_arena and not placement.endswith("_lowmem"):
        from worker.engine import pinned_arena

        try:
            pinned_arena.pin_in_place(module)
        except pinned_arena.PinError as exc:
            raise ProfileError(f"pinned_arena: {exc}") from exc
    if is_dit and spec.compile:
        # Before the offload hooks wrap each block's forward, so the hooks stay outside the graph.
        compile_blocks_under_hooks(module, fullgraph=spec.compile == "fullgraph",
                                   **block_compile_args(spec.compile_mode))
    apply_group_offloading(module, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=spec.blocks_per_group,
                           use_stream=True, record_stream=spec.record_stream,
                           low_cpu_mem_usage=placement.endswith("_lowmem"))


def compile_blocks_under_hooks(model, fullgraph: bool = True, **compile_args) -> int:
    """Regional compilation for a model whose blocks are about to be streamed.

    `compile_repeated_blocks` compiles each block's whole call, and with group offloading that call
    includes the offload hook (stream switches, copies, `record_stream`), which dynamo cannot trace in
    one graph. Here each block's `forward` becomes its class's forward compiled, with the block as an
    argument: the hooks, registered afterwards, wrap it and run eagerly, and all blocks of a class
    share one set of graphs instead of one per block. `compile_args` go to torch.compile.
    Returns how many blocks were wrapped."""
    import torch

    names = set(getattr(model, "_repeated_blocks", ()) or ())
    compiled: dict[type, object] = {}
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        cls = type(block)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, fullgraph=fullgraph, **compile_args)
        block.forward = functools.partial(compiled[cls], block)
    return len(blocks)


def _fuse(transformer, spec: Spec) -> None:
    from worker.engine import fuse

    fuse.fuse_projections(transformer, cudnn_attention=spec.attention == "cudnn", real_rope=spec.real_rope,
                          gate_kernel=spec.gate_kernel, qk_kernel=spec.qk_kernel, triton_ops=spec.triton_ops,
                          gate_warps=spec.gate_warps)


def _skip_patterns(module) -> tuple[str, ...]:
    """diffusers' default skip list (norms, embeddings of positions and patches) plus the model's own
    precision-sensitive layers (the DiT declares its timestep and caption embedders)."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    own = getattr(module, "_skip_layerwise_casting_patterns", None) or ()
    return tuple(dict.fromkeys(DEFAULT_SKIP_MODULES_PATTERN + tuple(own)))


def apply_profile(pipe, name: str, device="cuda", overrides: dict | None = None, cpu_trial: bool = False) -> Spec:
    """Place `pipe` (loaded on the CPU, except the components `gpu_components(name)` names, which
    may already be on `device`, and those `stream_loaded(name)` names, loaded in their stored form)
    according to profile `name`. Returns the spec applied.

    `cpu_trial`: on a CPU, apply what a CPU can of a GPU profile (`specs.on_cpu`: no streaming, pinning
    or CUDA graph) instead of refusing it; for trying its weights, fusions and compilation on the tiny
    model (`bench/profiles.py smoke --device cpu`, tests)."""
    spec = spec_for(name, overrides)
    kind = _device_type(device)
    if spec.recipe == "cpu":
        pipe.to("cpu")
        if spec.transformer != "gpu":   # a CPU lossy profile (specs.cpu_fp8): its DiT's weights in fp8
            convert_weights(pipe.transformer, spec.transformer, "cpu", pipe.transformer.dtype, spec)
        return spec
    if kind == "cpu" and cpu_trial and not spec.recipe:
        spec, _ = on_cpu(spec)
    elif kind != "cuda":
        raise ProfileError(f"profile {name!r} needs a CUDA GPU; on {kind} only 'cpu' applies")
    if spec.recipe == "model_offload":
        pipe.enable_model_cpu_offload(device=device)
        return spec
    if spec.recipe == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
        return spec

    compute_dtype = pipe.transformer.dtype
    # The DiT first: casting or moving it frees its bf16 host copy (the largest) before the text
    # encoder's pinned copy is made, which keeps peak host RSS lower.
    _place(pipe.transformer, spec.transformer, device, compute_dtype, spec)
    _place(pipe.text_encoder, spec.text_encoder, device, compute_dtype, spec)
    pipe.vae.to(device)
    if spec.vae_tiling:
        pipe.vae.enable_tiling()
        pipe.vae.tile_sample_min_size = VAE_TILE_PX
        pipe.vae.tile_latent_min_size = VAE_TILE_PX // (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    if spec.attention and spec.attention != "cudnn":
        pipe.transformer.set_attention_backend(spec.attention)
    if spec.compile and spec.transformer in RESIDENT:  # a streamed DiT's blocks were compiled in _place
        pipe.transformer.compile_repeated_blocks(fullgraph=spec.compile == "fullgraph",
                                                 **block_compile_args(spec.compile_mode))
    if spec.vae_compile:
        pipe.vae.decoder.compile(fullgraph=True)
    if spec.te_graph:
        from worker.engine import text_encoder

        text_encoder.install(pipe)
    return spec
