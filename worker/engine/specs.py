"""Memory/offload profiles by name: what each one places where, and in which number format.

A profile is a `Spec`: a placement per component, and the optional speed-ups on top (compilation,
fused projections, hand-written kernels, a CUDA-graph text encoder). Which profile a card gets is
decided from measurements (`shared.profiles`, the table `bench/profiles.py` writes); how a spec is
applied to a pipeline is `worker.engine.placement`. No torch here.

Each component has a placement:
  gpu            resident in the load dtype (loaded straight onto the GPU, no host copy)
  fp8            resident, weights stored as float8_e4m3fn and cast to bf16 layer by layer at call
  stream         block-level group offload from pinned host memory, the next group copied on a side
                 CUDA stream while the current one computes (a pinned second host copy is kept)
  stream_lowmem  the same, pinning on the fly instead of keeping a pinned copy (less host RAM, slower)
  fp8_stream     fp8 storage and streamed: half the bytes to copy and to pin
  fp8_stream_lowmem  fp8 storage, streamed, pinning on the fly
  fp8mm          resident, native fp8 weights with per-channel scales (`worker.engine.fp8`): compiles
                 with fullgraph and, on GPUs with fp8 tensor cores (compute capability >= 8.9),
                 multiplies in fp8. Loaded on the host and converted layer by layer on the GPU.
  fp8mm_stream   native fp8 weights, streamed block by block from pinned host memory
  fp8mm_stream_lowmem  the same, pinning on the fly (no pinned host copy: less host RAM)
  int8mm         resident, int8 weights with per-channel scales (`worker.engine.int8`): for GPUs with
                 int8 tensor cores and no fp8 ones (Turing, Ampere). In the DiT the matmuls run in
                 int8 (activations rounded per row at each call); elsewhere the weight is dequantised
                 at each call. Loaded straight from the files to the GPU one tensor at a time
                 (`worker.engine.streamload`): no host copy of the component.
  int8mm_stream  int8 weights, streamed block by block from pinned host memory (quantised on the GPU
                 while loading, then kept on the host)

A spec's `compute_dtype` is what its components load and compute in: "bf16", or "float32" for cards
without bf16 (Turing), where int8 weights keep the DiT at a quarter of its float32 size.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from shared import archs
from shared.errors import ProfileError
from worker.engine import compile_modes, policy

PLACEMENTS = ("gpu", "fp8", "stream", "stream_lowmem", "fp8_stream", "fp8_stream_lowmem", "fp8mm", "fp8mm_stream",
              "fp8mm_stream_lowmem", "int8mm", "int8mm_stream")
RESIDENT = ("gpu", "fp8", "fp8mm", "int8mm")
# Placements whose components load from the files already quantised (worker.engine.streamload).
STREAM_LOADED = ("int8mm", "int8mm_stream")
COMPUTE_DTYPES = ("bf16", "float32")
COMPILE_MODES = ("", "fullgraph", "graph_breaks")
RECIPES = ("", "model_offload", "sequential", "cpu")
CPU_PROFILE = "cpu"


# Placements whose weights a quantisation policy concerns.
QUANTISED_PLACEMENTS = ("fp8", "int8")


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
    # op called directly by the fused processor (worker.engine.fuse)
    attention: str = ""
    vae_compile: bool = False   # torch.compile the VAE decoder (one graph per tile or image size)
    fuse_projections: bool = False  # DiT q/k/v and w1/w3 as one matmul each (worker.engine.fuse); same numbers
    fp8_fast_accum: bool = False    # native fp8 matmuls without float32 promotion of partial sums
    te_graph: bool = False          # resident text encoder replayed as one CUDA graph (worker.engine.text_encoder)
    real_rope: bool = False         # the fused processor rotates q/k in real arithmetic, which inductor fuses
    compile_mode: str = ""          # how the DiT blocks are compiled (worker.engine.compile_modes)
    pinned_exact: bool = False      # streamed weights pinned at their exact size (pin_at_exact_sizes)
    pinned_arena: bool = False      # streamed weights page-locked in place, one buffer (worker.engine.pinned_arena)
    gate_kernel: bool = False       # feed-forward gate + fp8 row scaling in one Triton kernel (worker.engine.kernels.silu_gate)
    gate_warps: int = 0             # that kernel's warps a row; 0: its default (fp8_kernels.NUM_WARPS)
    qk_kernel: bool = False         # q/k head norms + rotary embedding in one Triton kernel (worker.engine.kernels.qk_norm_rope)
    triton_ops: bool = False        # those kernels as triton_ops, launched by inductor's code, not custom ops
    # What the components load and compute in: "bf16", or "float32" where the card has no bf16 (Turing).
    compute_dtype: str = "bf16"
    quant_policy: str = policy.DEFAULT  # which layers fp8 placements quantise (worker.engine.policy)
    fp8_scaling: str = "rowwise"    # how native fp8 layers are scaled (worker.engine.fp8_recipes); "tensor": naive

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
        policy.check(self.quant_policy)
        if self.fp8_scaling not in ("rowwise", "tensor"):
            raise ValueError(f"unknown fp8 scaling {self.fp8_scaling!r} (known: rowwise, tensor)")
        if self.fp8_scaling == "tensor" and (self.fuse_projections or self.gate_kernel):
            raise ValueError("the per-tensor fp8 recipe is a plain layer: it does not combine with fuse_projections")
        if self.recipe == "cpu" and (self.text_encoder != "gpu" or self.transformer not in ("gpu", "fp8mm")):
            raise ValueError("the cpu recipe keeps the text encoder as loaded and the DiT as loaded or in fp8mm")
        if self.te_graph and self.text_encoder not in ("gpu", "fp8mm", "int8mm"):
            raise ValueError("te_graph needs a resident text encoder (gpu, fp8mm or int8mm): moving weights cannot "
                             "be captured")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ProfileError(f"unknown compute dtype {self.compute_dtype!r} (known: {', '.join(COMPUTE_DTYPES)})")
        if self.compute_dtype == "float32" and self.attention == "cudnn":
            raise ProfileError('attention "cudnn" takes bf16 or fp16, not the float32 of compute_dtype "float32"')


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
    # Two blocks per group and record_stream (no host sync after each group): faster, for a little more
    # reserved VRAM (docs/performance.md).
    "group_stream_fp8": Spec("DiT and text encoder stored in fp8 and streamed two blocks at a time: half the "
                             "bytes to copy and pin", transformer="fp8_stream", text_encoder="fp8_stream",
                             vae_tiling=True, blocks_per_group=2, record_stream=True),
    "group_stream_fp8_lowmem": Spec("group_stream_fp8 pinning on the fly (no pinned host copies): less host RAM",
                                    transformer="fp8_stream_lowmem", text_encoder="fp8_stream_lowmem",
                                    vae_tiling=True, blocks_per_group=2, record_stream=True),
    # Native fp8 (worker.engine.fp8): fp8 weights with scales, fp8 matmuls where the GPU has them.
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
    # The text encoder streams as layerwise fp8 (fp8_stream), not as native fp8: its stage is faster that
    # way and the images stay within the fidelity rule (docs/performance.md).
    "fp8mm_stream": Spec("DiT in native fp8, text encoder in layerwise fp8, both streamed two blocks at a time",
                         transformer="fp8mm_stream", text_encoder="fp8_stream",
                         blocks_per_group=2, record_stream=True),
    # fp8mm_compiled made faster: DiT q/k/v and w1/w3 fused (worker.engine.fuse), fp8 matmuls with fast
    # accumulation, cuDNN attention, the text encoder replayed as a CUDA graph (worker.engine.text_encoder), and
    # RoPE in real arithmetic (worker.engine.fuse), which inductor fuses where complex numbers left eager kernels.
    # Not tuned (compile_mode "tuned"): tuning gains little and slows a worker's start (docs/performance.md).
    "fp8mm_fast_compiled": Spec("fp8mm_compiled with fused projections, fast fp8 accumulation, cuDNN attention, "
                                "fused RoPE and the text encoder as a CUDA graph", transformer="fp8mm",
                                compile="fullgraph", vae_compile=True, fuse_projections=True, fp8_fast_accum=True,
                                attention="cudnn", te_graph=True, real_rope=True),
    # fp8mm_fast_compiled with its two slowest generated kernels replaced: the feed-forward gate and its
    # fp8 scaling in one hand-written kernel (worker.engine.kernels.silu_gate), and the 3840-wide norms and scalings
    # as persistent reductions (worker.engine.compile_modes), each of which read its rows twice.
    "fp8mm_fast_gate_compiled": Spec("fp8mm_fast_compiled with the feed-forward gate in a hand-written kernel "
                                     "and the norms' row reductions in one pass", transformer="fp8mm",
                                     compile="fullgraph", vae_compile=True, fuse_projections=True,
                                     fp8_fast_accum=True, attention="cudnn", te_graph=True, real_rope=True,
                                     gate_kernel=True, compile_mode="persistent"),
    # fp8mm_fast_gate_compiled with the next generated kernels replaced: q and k's head norms and rotary
    # embedding in one hand-written kernel (worker.engine.kernels.qk_norm_rope). Both kernels stay custom ops:
    # declared as triton_ops, the gate kernel fails to compile inside inductor (docs/performance.md).
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
    # Its weights page-locked where they lie, at their size (worker.engine.pinned_arena), instead of in pinned
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
    # Native int8 (worker.engine.int8), for cards with int8 tensor cores and no fp8 ones (Turing, Ampere): the
    # fp8mm_fast profiles' speed-ups that need no e4m3 (fused projections, real-arithmetic RoPE, cuDNN attention,
    # the text encoder as a CUDA graph), none of the fp8 ones (fast accumulation, the gate kernel). The int8
    # components load from the files one tensor at a time, quantised on the GPU (worker.engine.streamload).
    "int8mm_fast_compiled": Spec("DiT in native int8 (int8 matmuls), resident and compiled, fused projections, "
                                 "cuDNN attention, fused RoPE; text encoder resident in bf16 as a CUDA graph; VAE "
                                 "decoder compiled", transformer="int8mm", compile="fullgraph", vae_compile=True,
                                 fuse_projections=True, attention="cudnn", te_graph=True, real_rope=True),
    "int8mm_both_fast_compiled": Spec("int8mm_fast_compiled with the text encoder's weights in int8 too (bf16 "
                                      "compute)", transformer="int8mm", text_encoder="int8mm", compile="fullgraph",
                                      vae_compile=True, fuse_projections=True, attention="cudnn", te_graph=True,
                                      real_rope=True),
    # The streamed text encoder pinned in place: pinned copies rounded to powers of two would take a 16 GB host
    # past what the worker may use (docs/profiles.md).
    "int8mm_fast_te_stream_pinned_compiled": Spec("DiT in native int8, resident and compiled, fused projections, "
                                                  "cuDNN attention, fused RoPE; text encoder in int8 weights, "
                                                  "streamed and pinned in place; VAE decoder compiled",
                                                  transformer="int8mm", text_encoder="int8mm_stream",
                                                  blocks_per_group=2, record_stream=True, compile="fullgraph",
                                                  vae_compile=True, fuse_projections=True, attention="cudnn",
                                                  real_rope=True, pinned_arena=True),
    "int8mm_fast_stream_pinned_compiled": Spec("DiT and text encoder in native int8 weights, both streamed two "
                                               "blocks at a time and pinned in place; DiT blocks compiled, fused "
                                               "projections, cuDNN attention, fused RoPE",
                                               transformer="int8mm_stream", text_encoder="int8mm_stream",
                                               blocks_per_group=2, record_stream=True, compile="fullgraph",
                                               fuse_projections=True, attention="cudnn", real_rope=True,
                                               pinned_arena=True),
    # Turing has no bf16 (and fp16 gives Z-Image NaN images): float32 compute around int8 weights, which keep the
    # DiT at a quarter of its float32 size. cuDNN attention takes no float32; the VAE decodes in tiles, as a
    # float32 decode of a whole 1024x1024 image needs twice the memory of a bf16 one.
    "int8mm_both_fp32_compiled": Spec("DiT in native int8 (int8 matmuls) and text encoder in int8 weights, float32 "
                                      "compute for cards without bf16, resident; DiT compiled, fused projections "
                                      "and RoPE, text encoder as a CUDA graph; tiled, compiled VAE decode",
                                      transformer="int8mm", text_encoder="int8mm", compute_dtype="float32",
                                      compile="fullgraph", vae_tiling=True, vae_compile=True, fuse_projections=True,
                                      te_graph=True, real_rope=True),
    "model_offload": Spec("enable_model_cpu_offload: each model moved whole to the GPU when used "
                          "(the common recipe, for comparison)", recipe="model_offload"),
    "sequential": Spec("enable_sequential_cpu_offload: every layer copied at use; last resort",
                       recipe="sequential"),
    "cpu": Spec("float32 on the CPU, no GPU", recipe="cpu"),
    # The CPU's lossy profiles: the DiT's block projections in fp8, their fp8 matmuls emulated in float32
    # (worker.engine.fp8_recipes). Never in the table; they show on a CPU what the GPU's fp8 loses, which
    # the quality gate (docs/quality.md) and its tests need.
    "cpu_fp8": Spec("float32 on the CPU with the DiT's block projections in fp8, row-wise scales (the GPU "
                    "profiles' recipe, emulated)", recipe="cpu", transformer="fp8mm"),
    "cpu_fp8_naive": Spec("cpu_fp8 with one fp8 scale per tensor and no floor: the naive recipe the quality "
                          "gate must catch", recipe="cpu", transformer="fp8mm", fp8_scaling="tensor"),
}

PROFILES: dict[str, str] = {name: spec.description for name, spec in SPECS.items()}


def is_lossy(spec: Spec) -> bool:
    """Whether the profile computes with less precision than bf16 (fp8 or int8 weights or matmuls, another
    attention kernel): such a profile is a class default only once the benchmark's fidelity check
    found its images not visibly different (`shared.profiles`). Compilation alone does not count."""
    placements = (spec.transformer, spec.text_encoder)
    # Tiled VAE decoding alone is not counted: alone it stays within the fidelity rule (bench/vae_tiling.py).
    # Each fp8 or int8 profile is judged on its own end-to-end comparison, tiles included. A policy that
    # quantises nothing (bf16) leaves fp8 and int8 placements in the load dtype.
    quantised = any(p.startswith(QUANTISED_PLACEMENTS) for p in placements) and policy.quantises_anything(spec.quant_policy)
    return quantised or bool(spec.attention)


# torch.library.triton_op, which `triton_ops` declares the kernels with, came in this torch release.
TRITON_OP_TORCH = "2.6"
# torch's pinned_max_round_threshold_mb allocator setting (`pinned_exact`): refused by 2.11, taken by 2.13.
PINNED_EXACT_TORCH = "2.13"


def requirements(spec: Spec) -> tuple[str, ...]:
    """What a card (with its torch and Triton) must offer to run `spec` as the table measured it: the
    capabilities of `shared.archs`, and minimum versions ("torch>=2.6"). Recorded in each table row, so
    the chooser can judge a card without importing this module."""
    if spec.recipe == "cpu":
        return ()
    needs = {archs.CUDA}
    if spec.compute_dtype == "bf16":
        needs.add(archs.BF16)
    compiled = bool(spec.compile or spec.vae_compile)
    if compiled:
        needs.add(archs.TRITON)
    dit, te = spec.transformer, spec.text_encoder
    if dit.startswith("fp8mm"):
        # The DiT multiplies in fp8 on fp8 tensor cores, and its compiled blocks round activations to e4m3.
        needs.add(archs.FP8_MATMUL)
        if spec.compile:
            needs.add(archs.TRITON_E4M3)
    fp8_weights = any(p.startswith("fp8") for p in (dit, te))
    if fp8_weights and spec.compile and dit.startswith("fp8"):
        # Compiled code around e4m3 weights: Triton below sm_89 refuses the type.
        needs.add(archs.TRITON_E4M3)
    if any(p.startswith("int8mm") for p in (dit, te)):
        # int8 weights laid out for torch._int_mm, which the DiT's layers call (int8 tensor cores, sm_75 on).
        # Nothing around them is e4m3: no TRITON_E4M3, no FP8_MATMUL.
        needs.add(archs.INT8_MATMUL)
    if spec.gate_kernel:
        needs |= {archs.TRITON, archs.TRITON_E4M3}   # the kernel stores e4m3
    if spec.qk_kernel:
        needs.add(archs.TRITON)
    if spec.triton_ops:
        needs.add(f"torch>={TRITON_OP_TORCH}")
    if spec.pinned_exact:
        needs.add(f"torch>={PINNED_EXACT_TORCH}")
    if spec.attention == "cudnn":
        needs.add(archs.CUDNN_ATTENTION)
    if spec.te_graph:
        needs.add(archs.CUDA_GRAPHS)
    return tuple(sorted(needs))


def applied_on(name: str, device: str) -> str:
    """The profile that runs when profile `name` is asked for on `device` ("cuda" or "cpu"): itself on a
    GPU and for the CPU's own profiles (recipe "cpu"); "cpu" for every GPU profile on a CPU."""
    spec = SPECS.get(name)
    return name if device == "cuda" or (spec is not None and spec.recipe == "cpu") else CPU_PROFILE


def policy_of(name: str) -> str:
    """The quantisation policy profile `name` applies (`worker.engine.policy`): its spec's, or "none" for a
    profile with no fp8 or int8 placement, which the policies do not concern; "" for a name no spec has."""
    spec = SPECS.get(name)
    if spec is None:
        return ""
    return spec.quant_policy if any(p.startswith(QUANTISED_PLACEMENTS) for p in (spec.transformer, spec.text_encoder)) \
        else "none"


def lossy_on(name: str, device: str, policy_name: str = "") -> bool:
    """Whether profile `name` on `device`, with quantisation policy `policy_name` ("": its own), computes
    below bf16 (`is_lossy`). A name no spec has counts as lossless (tests use such names)."""
    applied = applied_on(name, device)
    if applied not in SPECS:
        return False
    return is_lossy(spec_for(applied, {"quant_policy": policy_name} if policy_name else None))


def spec_for(name: str, overrides: dict | None = None) -> Spec:
    try:
        spec = SPECS[name]
    except KeyError:
        raise ProfileError(f"unknown profile {name!r} (known: {', '.join(SPECS)})") from None
    return dataclasses.replace(spec, **overrides) if overrides else spec


def stream_loaded(name: str, overrides: dict | None = None) -> dict[str, tuple[str, str]]:
    """Components this profile loads from the files already quantised, one tensor at a time
    (`worker.engine.streamload`): {"transformer": ("int8mm", quantisation policy), ...}."""
    spec = spec_for(name, overrides)
    if spec.recipe:
        return {}
    return {part: (placement, spec.quant_policy) for part, placement in (("transformer", spec.transformer),
                                                                        ("text_encoder", spec.text_encoder))
            if placement in STREAM_LOADED}


# What a CPU cannot do of a GPU profile: stream (CUDA streams), pin (page-locked memory), replay CUDA graphs.
_CPU_RESIDENT = {"stream": "gpu", "stream_lowmem": "gpu", "fp8_stream": "fp8", "fp8_stream_lowmem": "fp8",
                 "fp8mm_stream": "fp8mm", "fp8mm_stream_lowmem": "fp8mm", "int8mm_stream": "int8mm"}


def on_cpu(spec: Spec) -> tuple[Spec, list[str]]:
    """(`spec` as far as a CPU can apply it, what was left out): streamed components kept resident in
    their stored form, no pinning, no CUDA graph. For trying a GPU profile's weights, fusions and
    compilation on the tiny model without a GPU (`bench/profiles.py smoke --device cpu`, tests)."""
    changes: dict = {}
    for part in ("transformer", "text_encoder"):
        placement = getattr(spec, part)
        if placement in _CPU_RESIDENT:
            changes[part] = _CPU_RESIDENT[placement]
    for flag in ("te_graph", "pinned_arena", "pinned_exact", "record_stream"):
        if getattr(spec, flag):
            changes[flag] = False
    left_out = [f"{key}={getattr(spec, key)}" for key in changes]
    return (dataclasses.replace(spec, **changes) if changes else spec), left_out


def gpu_components(name: str, overrides: dict | None = None) -> tuple[str, ...]:
    """Components this profile keeps resident in the load dtype: they load straight onto the GPU."""
    spec = spec_for(name, overrides)
    if spec.recipe:
        return ()
    out = [part for part, placement in (("transformer", spec.transformer), ("text_encoder", spec.text_encoder))
           if placement == "gpu"]
    return tuple(out + ["vae"])
