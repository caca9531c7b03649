"""Load a ZImagePipeline from a local folder, a `modelscope:ORG/NAME` id, or a Hugging Face id.

Weights are loaded in bf16 on GPUs that compute it (Ampere and later) and float32 elsewhere; never
fp16 by default (Z-Image in fp16 is reported to give NaN/black images). Components named in
`gpu_components` are streamed straight from the files onto the GPU, so a profile that keeps them
resident does not hold a host copy first (host RAM is part of what a profile costs).
"""
from __future__ import annotations

import logging

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


def _load(folder: str, dtype, gpu_components, device: str):
    from diffusers import ZImagePipeline

    preloaded = {}
    for name in gpu_components:
        # Streams the weights from the files onto the device: no host copy of this component.
        preloaded[name] = _component_loader(name).from_pretrained(
            folder, subfolder=name, dtype=dtype, device_map=device)
    return ZImagePipeline.from_pretrained(folder, dtype=dtype, **preloaded)


def load_pipeline(model: str, dtype, cache_dir: str = "", gpu_components=(), device: str = "cuda"):
    """Load the pipeline named by `model` (local folder, `modelscope:ORG/NAME` or Hugging Face id,
    resolved by `worker.engine.model_source`) with weights in `dtype`.

    `gpu_components` (names from COMPONENTS) load straight onto `device`; the rest load on the CPU.
    Raises ModelNotFound when no source has the model.
    """
    folder = model_source.resolve_model(model, cache_dir)
    return _load(folder, dtype, gpu_components, device)
