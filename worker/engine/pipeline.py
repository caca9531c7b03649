"""Load a ZImagePipeline from a local folder, a `modelscope:ORG/NAME` id, or a Hugging Face id.

Weights are loaded in bf16 on GPUs that compute it (Ampere and later) and float32 elsewhere, or in
what a profile's `compute_dtype` says; never fp16 (Z-Image in fp16 is reported to give NaN/black
images). Components named in `gpu_components` are streamed straight from the files onto the GPU, so a
profile that keeps them resident does not hold a host copy first (host RAM is part of what a profile
costs); components in `stream_loaded` are read one tensor at a time into the quantised form their
placement stores (`worker.engine.placement.load_stored`), again without a host copy of the whole.
"""
from __future__ import annotations

import logging
import os

from shared import archs
from worker.engine import emulation, model_source

log = logging.getLogger(__name__)

COMPONENTS = ("transformer", "text_encoder", "vae")
# One owner of finding the model: this module only loads the folder it resolves.
ModelNotFound = model_source.ModelNotFound


def default_dtype(device: str):
    """bf16 on a GPU that computes it natively (compute capability >= 8.0, and not playing an older
    architecture: `worker.engine.emulation`), else float32."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        emulated = emulation.active()
        if emulated is not None and not emulated.meets(archs.BF16):
            major = 7
        if major >= 8:
            return torch.bfloat16
        log.warning("this GPU (compute capability %d.x) has no native bf16: loading float32 "
                    "(fp16 is not used: Z-Image gives NaN images in fp16)", major)
    return torch.float32


def load_dtype(spec, device: str):
    """The dtype a profile's pipeline loads and computes in: float32 for the CPU profile and for a spec
    whose `compute_dtype` is "float32", else `default_dtype(device)`."""
    import torch

    if spec.recipe == "cpu" or spec.compute_dtype == "float32":
        return torch.float32
    return default_dtype(device)


def _component_loader(name: str):
    if name == "transformer":
        from diffusers import ZImageTransformer2DModel

        return ZImageTransformer2DModel
    if name == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL
    if name == "text_encoder":
        from transformers import AutoModel

        return AutoModel
    raise ValueError(f"unknown component {name!r} (known: {', '.join(COMPONENTS)})")


def empty_component(folder: str, name: str, dtype):
    """Component `name` of the pipeline in `folder`, built from its configuration on the meta device
    (parameters without memory; buffers it computes itself are real), parameters in `dtype`."""
    from accelerate import init_empty_weights

    loader = _component_loader(name)
    with init_empty_weights():
        if name == "text_encoder":
            from transformers import AutoConfig

            return loader.from_config(AutoConfig.from_pretrained(os.path.join(folder, name)), dtype=dtype)
        return loader.from_config(loader.load_config(folder, subfolder=name)).to(dtype)


def _load(folder: str, dtype, gpu_components, device: str, stream_loaded: dict | None = None):
    from diffusers import ZImagePipeline

    from worker.engine import placement

    preloaded = {}
    # The DiT first: the largest, read while the least else is held.
    for name, (where, quant_policy) in sorted((stream_loaded or {}).items(), key=lambda item: item[0] != "transformer"):
        preloaded[name] = placement.load_stored(folder, name, where, dtype, device, quant_policy=quant_policy)
    for name in gpu_components:
        # Streams the weights from the files onto the device: no host copy of this component.
        preloaded[name] = _component_loader(name).from_pretrained(
            folder, subfolder=name, dtype=dtype, device_map=device)
    return ZImagePipeline.from_pretrained(folder, dtype=dtype, **preloaded)


def load_pipeline(model: str, dtype, cache_dir: str = "", gpu_components=(), device: str = "cuda",
                  stream_loaded: dict | None = None):
    """Load the pipeline named by `model` (local folder, `modelscope:ORG/NAME` or Hugging Face id,
    resolved by `worker.engine.model_source`) with weights in `dtype`.

    `gpu_components` (names from COMPONENTS) load straight onto `device`; `stream_loaded` ({name:
    (placement, quantisation policy)}, `specs.stream_loaded`) load tensor by tensor in their placement's stored form; the rest
    load on the CPU. Raises ModelNotFound when no source has the model.
    """
    folder = model_source.resolve_model(model, cache_dir)
    return _load(folder, dtype, gpu_components, device, stream_loaded)
