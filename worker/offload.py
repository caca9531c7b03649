"""Memory/offload profiles: how a loaded ZImagePipeline is placed on a GPU, by name.

Placement uses diffusers' own mechanisms: `apply_group_offloading` (block level, CUDA streams),
layerwise casting (float8_e4m3fn storage, bf16 compute), `compile_repeated_blocks` (regional
compilation of the DiT blocks), VAE tiling, `enable_model_cpu_offload` and
`enable_sequential_cpu_offload`. Which profile a card gets is decided from measurements
(`shared.profiles`, table written by `bench/profiles.py`); this module only knows how to apply one.

Each component has a placement:
  gpu            resident in the load dtype (loaded straight onto the GPU, no host copy)
  fp8            resident, weights stored as float8_e4m3fn and cast to bf16 layer by layer at call
  stream         block-level group offload from pinned host memory, the next group copied on a side
                 CUDA stream while the current one computes (a pinned second host copy is kept)
  stream_lowmem  the same, pinning on the fly instead of keeping a pinned copy (less host RAM, slower)
  fp8_stream     fp8 storage and streamed: half the bytes to copy and to pin
  fp8_stream_lowmem  fp8 storage, streamed, pinning on the fly
  fp8mm          resident, native fp8 weights with per-channel scales (`worker.fp8`): compiles with
                 fullgraph and, on GPUs with fp8 tensor cores (compute capability >= 8.9), multiplies
                 in fp8. Loaded on the host and converted layer by layer on the GPU.
  fp8mm_stream   native fp8 weights, streamed block by block from pinned host memory
  fp8mm_stream_lowmem  the same, pinning on the fly (no pinned host copy: less host RAM)

On top of placements a profile may fuse the DiT's projections (`worker.fuse`: q/k/v and w1/w3 as one
matmul each, the same arithmetic), let fp8 matmuls accumulate fast, call cuDNN attention directly, and
replay a resident text encoder as one CUDA graph (`worker.text_encoder`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

from worker import compile_modes
from worker.compile_modes import block_compile_args

# Tile side (pixels) of the tiled VAE decode used by the small-card profiles: a 1024x1024 decode
# otherwise needs ~2 GiB of activations on top of the resident weights, at the very end of a job.
VAE_TILE_PX = 512
PLACEMENTS = ("gpu", "fp8", "stream", "stream_lowmem", "fp8_stream", "fp8_stream_lowmem", "fp8mm", "fp8mm_stream",
              "fp8mm_stream_lowmem")
RESIDENT = ("gpu", "fp8", "fp8mm")
COMPILE_MODES = ("", "fullgraph", "graph_breaks")
# Pinned host blocks above this size (MB) are allocated at their size, not the next power of two.
# Small ones keep the rounding, which lets torch reuse them for the pipeline's small transfers.
PINNED_ROUND_MAX_MB = 1
RECIPES = ("", "model_offload", "sequential", "cpu")
CPU_PROFILE = "cpu"


@dataclass(frozen=True)
class Spec:
    description: str
    transformer: str = "gpu"
    text_encoder: str = "gpu"
    # "fullgraph": compile_repeated_blocks(fullgraph=True). "graph_breaks": fullgraph=False, for fp8
    # layerwise casting, whose per-layer `module.to(dtype)` dynamo cannot trace: each cast Linear
    # runs eagerly and the elementwise work between them (norms, RoPE, gating) is still fused.
    compile: str = ""
    vae_tiling: bool = False
    recipe: str = ""            # a whole-pipeline recipe instead of per-component placement
    blocks_per_group: int = 1   # blocks per group for streamed components
    record_stream: bool = False
    # diffusers attention backend name; "" keeps the default (SDPA); "cudnn": torch's cuDNN attention
    # op called directly by the fused processor (worker.fuse)
    attention: str = ""
    vae_compile: bool = False   # torch.compile the VAE decoder (one graph per tile or image size)
    fuse_projections: bool = False  # DiT q/k/v and w1/w3 as one matmul each (worker.fuse); same numbers
    fp8_fast_accum: bool = False    # native fp8 matmuls without float32 promotion of partial sums
    te_graph: bool = False          # resident text encoder replayed as one CUDA graph (worker.text_encoder)
    real_rope: bool = False         # the fused processor rotates q/k in real arithmetic, which inductor fuses
    compile_mode: str = ""          # how the DiT blocks are compiled (worker.compile_modes)
    pinned_exact: bool = False      # streamed weights pinned at their exact size (pin_at_exact_sizes)
    pinned_arena: bool = False      # streamed weights page-locked in place, one buffer (worker.pinned_arena)
    gate_kernel: bool = False       # feed-forward gate + fp8 row scaling in one Triton kernel (worker.fp8_kernels)
    gate_warps: int = 0             # that kernel's warps a row; 0: its default (fp8_kernels.NUM_WARPS)
    qk_kernel: bool = False         # q/k head norms + rotary embedding in one Triton kernel (worker.qk_kernel)
    triton_ops: bool = False        # those kernels as triton_ops, launched by inductor's code, not custom ops

    def __post_init__(self):
        for part in (self.transformer, self.text_encoder):
            if part not in PLACEMENTS:
                raise ValueError(f"unknown placement {part!r} (known: {', '.join(PLACEMENTS)})")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {self.compile!r}")
        compile_modes.check_mode(self.compile_mode)
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}")
        if self.fuse_projections and self.transformer in ("fp8", "fp8_stream", "fp8_stream_lowmem"):
            # Layerwise casting hooks each Linear: a fused layer would lose its hook and keep bf16 weights.
            raise ValueError("fuse_projections does not combine with layerwise fp8 casting of the DiT")
        if self.attention == "cudnn" and not self.fuse_projections:
            raise ValueError('attention "cudnn" is the fused processor\'s: it needs fuse_projections')
        if self.real_rope and not self.fuse_projections:
            raise ValueError("real_rope is the fused processor's: it needs fuse_projections")
        if self.gate_kernel and not (self.fuse_projections and self.transformer.startswith("fp8mm")):
            raise ValueError("gate_kernel feeds a native fp8 w2 from the fused w1/w3: it needs transformer "
                             "fp8mm* and fuse_projections")
        if self.qk_kernel and not self.fuse_projections:
            raise ValueError("qk_kernel is the fused processor's: it needs fuse_projections")
        if self.triton_ops and not (self.gate_kernel or self.qk_kernel):
            raise ValueError("triton_ops concerns the hand-written kernels: it needs gate_kernel or qk_kernel")
        if self.gate_warps and not self.gate_kernel:
            raise ValueError("gate_warps is the gate kernel's: it needs gate_kernel")
        if self.gate_warps not in (0, 1, 2, 4, 8, 16, 32):
            raise ValueError(f"gate_warps must be 0 or a power of two up to 32, got {self.gate_warps}")
        if self.pinned_arena and not any(part not in RESIDENT and not part.endswith("_lowmem")
                                         for part in (self.transformer, self.text_encoder)):
            raise ValueError("pinned_arena concerns weights streamed from pinned copies: this profile streams none")
        if self.pinned_arena and self.pinned_exact:
            raise ValueError("pinned_arena and pinned_exact both size the pinned weights: choose one")
        if self.pinned_exact and self.transformer in RESIDENT and self.text_encoder in RESIDENT:
            raise ValueError("pinned_exact concerns streamed weights: this profile streams none")
        if self.te_graph and self.text_encoder not in ("gpu", "fp8mm"):
            raise ValueError("te_graph needs a resident text encoder (gpu or fp8mm): moving weights cannot be captured")


SPECS: dict[str, Spec] = {
    "resident": Spec("everything on the GPU in bf16"),
    "resident_compiled": Spec("everything on the GPU in bf16, DiT blocks compiled (regional compilation)",
                              compile="fullgraph"),
    "te_fp8_resident": Spec("everything on the GPU; text encoder stored in fp8 (layerwise casting)",
                            text_encoder="fp8"),
    "te_fp8_resident_compiled": Spec("everything on the GPU; text encoder stored in fp8; DiT blocks compiled",
                                     text_encoder="fp8", compile="fullgraph"),
    "fp8_both_resident": Spec("everything on the GPU; DiT and text encoder stored in fp8; tiled VAE decode",
                              transformer="fp8", text_encoder="fp8", vae_tiling=True),
    "fp8_both_resident_compiled": Spec(
        "everything on the GPU; DiT and text encoder stored in fp8; DiT blocks compiled around the casts; "
        "tiled VAE decode", transformer="fp8", text_encoder="fp8", compile="graph_breaks", vae_tiling=True),
    "te_stream": Spec("text encoder streamed from pinned host memory (group offload, CUDA stream); "
                      "DiT and VAE resident; tiled VAE decode", text_encoder="stream", vae_tiling=True),
    "te_stream_compiled": Spec("te_stream with the DiT blocks compiled", text_encoder="stream",
                               compile="fullgraph", vae_tiling=True),
    "te_fp8_stream_compiled": Spec("text encoder stored in fp8 and streamed; DiT resident in bf16 and compiled; "
                                   "tiled VAE decode", text_encoder="fp8_stream", compile="fullgraph",
                                   vae_tiling=True),
    "te_stream_lowmem": Spec("te_stream pinning on the fly (no pinned host copy): less host RAM",
                             text_encoder="stream_lowmem", vae_tiling=True),
    "te_stream_fp8": Spec("text encoder streamed; DiT resident stored in fp8 (layerwise casting); tiled VAE decode",
                          transformer="fp8", text_encoder="stream", vae_tiling=True),
    "te_stream_fp8_compiled": Spec("te_stream_fp8 with the DiT blocks compiled around the casts",
                                   transformer="fp8", text_encoder="stream", compile="graph_breaks",
                                   vae_tiling=True),
    "fp8_both_stream_compiled": Spec("text encoder fp8 and streamed; DiT resident in fp8, blocks compiled around "
                                     "the casts; tiled VAE decode", transformer="fp8", text_encoder="fp8_stream",
                                     compile="graph_breaks", vae_tiling=True),
    "group_stream": Spec("DiT and text encoder streamed block by block (group offload, CUDA streams); VAE resident",
                         transformer="stream", text_encoder="stream", vae_tiling=True),
    "group_stream_lowmem": Spec("group_stream pinning on the fly (no pinned host copies): least host RAM",
                                transformer="stream_lowmem", text_encoder="stream_lowmem", vae_tiling=True),
    # Two blocks per group and record_stream (no host sync after each group) measured 2.06 s/img
    # against 2.66 with one block and syncs, for 1.6 GiB more reserved VRAM (still far under 7 GiB).
    "group_stream_fp8": Spec("DiT and text encoder stored in fp8 and streamed two blocks at a time: half the "
                             "bytes to copy and pin", transformer="fp8_stream", text_encoder="fp8_stream",
                             vae_tiling=True, blocks_per_group=2, record_stream=True),
    "group_stream_fp8_lowmem": Spec("group_stream_fp8 pinning on the fly (no pinned host copies): less host RAM",
                                    transformer="fp8_stream_lowmem", text_encoder="fp8_stream_lowmem",
                                    vae_tiling=True, blocks_per_group=2, record_stream=True),
    # Native fp8 (worker.fp8): fp8 weights with scales, fp8 matmuls where the GPU has them.
    "fp8mm_compiled": Spec("DiT in native fp8 (fp8 matmuls on compute capability >= 8.9), blocks compiled; "
                           "text encoder resident in bf16; VAE decoder compiled", transformer="fp8mm",
                           compile="fullgraph", vae_compile=True),
    "fp8mm_both_compiled": Spec("DiT in native fp8, blocks compiled; text encoder in native fp8 weights (bf16 "
                                "compute); all resident; VAE decoder compiled", transformer="fp8mm",
                                text_encoder="fp8mm", compile="fullgraph", vae_compile=True),
    "fp8mm_te_stream_compiled": Spec("DiT in native fp8, resident and compiled; text encoder in native fp8 "
                                     "weights, streamed; tiled, compiled VAE decode", transformer="fp8mm",
                                     text_encoder="fp8mm_stream", compile="fullgraph", vae_tiling=True,
                                     vae_compile=True),
    "fp8mm_te_bf16_stream_compiled": Spec("DiT in native fp8, resident and compiled; text encoder in bf16, "
                                          "streamed; VAE decoder compiled", transformer="fp8mm",
                                          text_encoder="stream", compile="fullgraph", vae_compile=True),
    # The text encoder streams as layerwise fp8 (fp8_stream), not as native fp8: on an H100 at a 7 GiB
    # cap its stage took 0.58 s against 0.93 s, and the images stayed within the rule (44.2 dB).
    "fp8mm_stream": Spec("DiT in native fp8, text encoder in layerwise fp8, both streamed two blocks at a time",
                         transformer="fp8mm_stream", text_encoder="fp8_stream",
                         blocks_per_group=2, record_stream=True),
    # fp8mm_compiled made faster: DiT q/k/v and w1/w3 fused (worker.fuse), fp8 matmuls with fast
    # accumulation, cuDNN attention, the text encoder replayed as a CUDA graph (worker.text_encoder), and
    # RoPE in real arithmetic (worker.fuse), which inductor fuses where complex numbers left eager kernels.
    # Not tuned (compile_mode "tuned"): 0.615 -> 0.602-0.605 s/img on an H100, but a start with a filled
    # compile cache took 25.7-33.8 s instead of 19.6-21.0 (the warm-up 12.9-20.8 s instead of ~6).
    "fp8mm_fast_compiled": Spec("fp8mm_compiled with fused projections, fast fp8 accumulation, cuDNN attention, "
                                "fused RoPE and the text encoder as a CUDA graph", transformer="fp8mm",
                                compile="fullgraph", vae_compile=True, fuse_projections=True, fp8_fast_accum=True,
                                attention="cudnn", te_graph=True, real_rope=True),
    # fp8mm_fast_compiled with its two slowest generated kernels replaced: the feed-forward gate and its
    # fp8 scaling in one hand-written kernel (worker.fp8_kernels), and the 3840-wide norms and scalings
    # as persistent reductions (worker.compile_modes), each of which read its rows twice.
    "fp8mm_fast_gate_compiled": Spec("fp8mm_fast_compiled with the feed-forward gate in a hand-written kernel "
                                     "and the norms' row reductions in one pass", transformer="fp8mm",
                                     compile="fullgraph", vae_compile=True, fuse_projections=True,
                                     fp8_fast_accum=True, attention="cudnn", te_graph=True, real_rope=True,
                                     gate_kernel=True, compile_mode="persistent"),
    # fp8mm_fast_gate_compiled with the next generated kernels replaced: q and k's head norms and rotary
    # embedding in one hand-written kernel (worker.qk_kernel). Both kernels stay custom ops: declared as
    # triton_ops, which inductor launches from its own code, the gate kernel failed to compile inside
    # inductor on the lent H100s (Triton 3.6.0: "PassManager::run failed" in make_llir, 2026-12-06),
    # though it compiles alone there.
    "fp8mm_fast_qk_compiled": Spec("fp8mm_fast_gate_compiled with q/k norms and rotation in a hand-written kernel "
                                   "too", transformer="fp8mm",
                                   compile="fullgraph", vae_compile=True, fuse_projections=True,
                                   fp8_fast_accum=True, attention="cudnn", te_graph=True, real_rope=True,
                                   gate_kernel=True, compile_mode="persistent", qk_kernel=True),
    "fp8mm_both_fast_compiled": Spec("fp8mm_both_compiled made fast as fp8mm_fast_compiled",
                                     transformer="fp8mm", text_encoder="fp8mm", compile="fullgraph",
                                     vae_compile=True, fuse_projections=True, fp8_fast_accum=True,
                                     attention="cudnn", te_graph=True, real_rope=True),
    "fp8mm_fast_te_bf16_stream_compiled": Spec("fp8mm_te_bf16_stream_compiled with fused projections, fast fp8 "
                                               "accumulation, cuDNN attention and fused RoPE", transformer="fp8mm",
                                               text_encoder="stream", compile="fullgraph", vae_compile=True,
                                               fuse_projections=True, fp8_fast_accum=True, attention="cudnn",
                                               real_rope=True),
    # The streamed DiT's blocks compiled beneath the offload hooks (compile_blocks_under_hooks).
    "fp8mm_fast_stream_compiled": Spec("fp8mm_stream with the DiT blocks compiled, fused projections, fast fp8 "
                                       "accumulation, cuDNN attention and fused RoPE",
                                       transformer="fp8mm_stream", text_encoder="fp8_stream", blocks_per_group=2,
                                       record_stream=True, compile="fullgraph", fuse_projections=True,
                                       fp8_fast_accum=True, attention="cudnn", real_rope=True),
    # Its weights page-locked where they lie, at their size (worker.pinned_arena), instead of in pinned
    # copies that torch rounds up to powers of two: less host RAM for the same copies.
    "fp8mm_fast_stream_pinned_compiled": Spec("fp8mm_fast_stream_compiled with the streamed weights pinned in "
                                              "place at their size (less host RAM)",
                                              transformer="fp8mm_stream", text_encoder="fp8_stream",
                                              blocks_per_group=2, record_stream=True, compile="fullgraph",
                                              fuse_projections=True, fp8_fast_accum=True, attention="cudnn",
                                              real_rope=True, pinned_arena=True),
    "fp8mm_fast_stream_lowmem_compiled": Spec("fp8mm_fast_stream_compiled pinning on the fly (no pinned host "
                                              "copies): for hosts with less RAM", transformer="fp8mm_stream_lowmem",
                                              text_encoder="fp8_stream_lowmem", record_stream=True,
                                              compile="fullgraph", fuse_projections=True, fp8_fast_accum=True,
                                              attention="cudnn", real_rope=True),
    "model_offload": Spec("enable_model_cpu_offload: each model moved whole to the GPU when used "
                          "(the common recipe, for comparison)", recipe="model_offload"),
    "sequential": Spec("enable_sequential_cpu_offload: every layer copied at use; last resort",
                       recipe="sequential"),
    "cpu": Spec("float32 on the CPU, no GPU", recipe="cpu"),
}

PROFILES: dict[str, str] = {name: spec.description for name, spec in SPECS.items()}


def is_lossy(spec: Spec) -> bool:
    """Whether the profile computes with less precision than bf16 (fp8 weights or matmuls, another
    attention kernel): such a profile is a class default only once the benchmark's fidelity check
    found its images not visibly different (`shared.profiles`). Compilation alone does not count."""
    placements = (spec.transformer, spec.text_encoder)
    # Tiled VAE decoding alone is not counted: it measured 42.1-42.5 dB against whole decoding
    # (bench/vae_tiling.py, bench/results/vae_tiling.jsonl), within the rule. Together with fp8 it was
    # 39.5-39.8 dB: each fp8 profile is judged on its own end-to-end comparison, tiles included.
    return any(p.startswith("fp8") for p in placements) or bool(spec.attention)


class ProfileError(ValueError):
    """Raised for an unknown profile, or a GPU profile asked for on a machine without one."""


def spec_for(name: str, overrides: dict | None = None) -> Spec:
    try:
        spec = SPECS[name]
    except KeyError:
        raise ProfileError(f"unknown profile {name!r} (known: {', '.join(SPECS)})") from None
    return dataclasses.replace(spec, **overrides) if overrides else spec


def gpu_components(name: str, overrides: dict | None = None) -> tuple[str, ...]:
    """Components this profile keeps resident in the load dtype: they load straight onto the GPU."""
    spec = spec_for(name, overrides)
    if spec.recipe:
        return ()
    out = [part for part, placement in (("transformer", spec.transformer), ("text_encoder", spec.text_encoder))
           if placement == "gpu"]
    return tuple(out + ["vae"])


def _device_type(device) -> str:
    return device.type if hasattr(device, "type") else str(device).split(":")[0]


def convert_weights(module, placement: str, device, compute_dtype, spec: Spec, host="cpu") -> None:
    """Give `module` the weight form its placement stores (native fp8, layerwise fp8, or as loaded) and
    fuse a DiT's projections if the spec says so. Converted weights end on `device` for a resident
    placement, else on `host`. With `device` and `host` "meta" nothing is allocated: `bench/pinned.py`
    sizes a profile's streamed weights that way."""
    import torch
    from diffusers.hooks import apply_layerwise_casting

    is_dit = hasattr(module, "noise_refiner")
    if placement.startswith("fp8mm"):
        from worker import fp8

        # fp8 matmuls only in the DiT, where the compute is: the text encoder runs once per image on one
        # 512-token prompt, so rounding its activations to fp8 too would buy nothing measurable.
        fp8_matmul = fp8.has_fp8_matmul(device) and is_dit
        fp8.convert(module, compute_dtype, fp8_matmul, work_device=device,
                    out_device=device if placement in RESIDENT else host, fast_accum=spec.fp8_fast_accum)
    elif placement.startswith("fp8"):
        # Cast on the host, before the move: the bf16 weights would not fit beside the rest on a small card.
        apply_layerwise_casting(module, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                                skip_modules_pattern=_skip_patterns(module))
    if is_dit and spec.fuse_projections:
        _fuse(module, spec)


def pin_at_exact_sizes() -> None:
    """Make torch's pinned host allocator give large blocks their exact size.

    It rounds every block up to a power of two (pytorch/pytorch#150517), and diffusers' group offload
    pins each streamed tensor on its own: +41-59% host RAM for this model's weights (`bench/pinned.py`).
    Process-wide. torch 2.13 knows the setting; torch 2.11 refuses it ("Unrecognized key", seen on the
    GPU machine), which becomes a ProfileError naming the torch version. Raises RuntimeError where torch
    has no allocator-settings call at all."""
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
        from worker import pinned_arena

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
    from worker import fuse

    fuse.fuse_projections(transformer, cudnn_attention=spec.attention == "cudnn", real_rope=spec.real_rope,
                          gate_kernel=spec.gate_kernel, qk_kernel=spec.qk_kernel, triton_ops=spec.triton_ops,
                          gate_warps=spec.gate_warps)


def _skip_patterns(module) -> tuple[str, ...]:
    """diffusers' default skip list (norms, embeddings of positions and patches) plus the model's own
    precision-sensitive layers (the DiT declares its timestep and caption embedders)."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    own = getattr(module, "_skip_layerwise_casting_patterns", None) or ()
    return tuple(dict.fromkeys(DEFAULT_SKIP_MODULES_PATTERN + tuple(own)))


def apply_profile(pipe, name: str, device="cuda", overrides: dict | None = None) -> Spec:
    """Place `pipe` (loaded on the CPU, except the components `gpu_components(name)` names, which
    may already be on `device`) according to profile `name`. Returns the spec applied."""
    spec = spec_for(name, overrides)
    kind = _device_type(device)
    if spec.recipe == "cpu":
        pipe.to("cpu")
        return spec
    if kind != "cuda":
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
        from worker import text_encoder

        text_encoder.install(pipe)
    return spec
