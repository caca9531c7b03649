"""Load a ZImagePipeline from a local folder, a `modelscope:ORG/NAME` id, or a Hugging Face id.

Weights are loaded in bf16 on GPUs that compute it (Ampere and later) and float32 elsewhere; never
fp16 by default (Z-Image in fp16 is reported to give NaN/black images). Components named in
`gpu_components` are streamed straight from the files onto the GPU, so a profile that keeps them
resident does not hold a host copy first (host RAM is part of what a profile costs).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

MODELSCOPE_PREFIX = "modelscope:"
PIPELINE_FILE = "model_index.json"
COMPONENTS = ("transformer", "text_encoder", "vae")
HINT = ("Point ZFARM_MODEL at a local folder holding a ZImagePipeline (model_index.json with transformer/, "
        "text_encoder/, vae/, tokenizer/, scheduler/), for example one written by "
        "`huggingface-cli download Tongyi-MAI/Z-Image-Turbo --local-dir DIR`, or use "
        "ZFARM_MODEL=modelscope:Tongyi-MAI/Z-Image-Turbo where the Hugging Face Hub is out of reach.")


class ModelNotFound(RuntimeError):
    """The model could not be found or downloaded. The message lists each source tried and why it
    failed, and how to point ZFARM_MODEL at a local folder."""

    def __init__(self, model: str, tried: list[str]):
        self.model = model
        self.tried = list(tried)
        lines = [f"cannot load the Z-Image pipeline {model!r}. Tried:"]
        lines += [f"  - {t}" for t in tried]
        lines.append(HINT)
        super().__init__("\n".join(lines))


def default_dtype(device: str):
    """bf16 on a GPU that computes it natively (compute capability >= 8.0), else float32."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        if major >= 8:
            return torch.bfloat16
        log.warning("this GPU (compute capability %d.x) has no native bf16: loading float32 "
                    "(fp16 is not used: Z-Image gives NaN images in fp16)", major)
    return torch.float32


def _offline(env: str) -> bool:
    return os.environ.get(env, "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(model: str) -> bool:
    """A hub id is ORG/NAME; anything absolute, relative-dotted, home-based or deeper is a path."""
    return (model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or "\\" in model
            or model in (".", ".."))


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"


def _local_folder(model: str) -> Path | None:
    path = Path(model).expanduser()
    return path if path.is_dir() else None


def _check_folder(model: str, folder: Path, source: str) -> None:
    if not (folder / PIPELINE_FILE).is_file():
        raise ModelNotFound(model, [f"{source} {str(folder)!r}: the folder has no {PIPELINE_FILE}, "
                                    "so it is not a diffusers pipeline"])


def _modelscope_errors() -> tuple:
    """What a failed ModelScope look-up raises: HTTP and OS errors, and (modelscope >= 1.30) the
    hub client's own HubError, which derives from Exception only."""
    errors = [OSError, ValueError, RuntimeError]
    try:
        from modelscope_hub.errors import HubError
    except ImportError:
        return tuple(errors)
    return tuple(errors + [HubError])


def _modelscope_folder(model: str, model_id: str, cache_dir: str) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise ModelNotFound(model, [f"ModelScope {model_id!r}: the modelscope package is not installed ({exc})"])
    # ModelScope has no offline switch of its own; the Hub's one means "no network" here as well.
    offline = _offline("HF_HUB_OFFLINE") or _offline("MODELSCOPE_OFFLINE")
    try:
        folder = snapshot_download(model_id, cache_dir=cache_dir or None, local_files_only=offline)
    except _modelscope_errors() as exc:
        where = f"cache {cache_dir!r}" if cache_dir else "the default cache"
        mode = "offline, cache only" if offline else "download"
        raise ModelNotFound(model, [f"ModelScope {model_id!r} ({mode}, {where}): {_short(exc)}"]) from exc
    return Path(folder)


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


def _load(source: str, dtype, cache_dir: str, gpu_components, device: str):
    from diffusers import ZImagePipeline

    extra = {"cache_dir": cache_dir} if cache_dir else {}
    preloaded = {}
    for name in gpu_components:
        # Streams the weights from the files onto the device: no host copy of this component.
        preloaded[name] = _component_loader(name).from_pretrained(
            source, subfolder=name, dtype=dtype, device_map=device, **extra)
    return ZImagePipeline.from_pretrained(source, dtype=dtype, **extra, **preloaded)


def load_pipeline(model: str, dtype, cache_dir: str = "", gpu_components=(), device: str = "cuda"):
    """Load the pipeline named by `model` with weights in `dtype`.

    - an existing local folder loads as is;
    - `modelscope:ORG/NAME` downloads through `modelscope.snapshot_download`, then loads that folder;
    - anything else is a Hugging Face id for `ZImagePipeline.from_pretrained` (cache in `cache_dir`).
    `gpu_components` (names from COMPONENTS) load straight onto `device`; the rest load on the CPU.
    Raises ModelNotFound when no source has the model.
    """
    model = model.strip()
    if not model:
        raise ModelNotFound(model, ["nothing: ZFARM_MODEL is empty"])
    if model.startswith(MODELSCOPE_PREFIX):
        model_id = model[len(MODELSCOPE_PREFIX):].strip()
        folder = _modelscope_folder(model, model_id, cache_dir)
        _check_folder(model, folder, "ModelScope download")
        return _load(str(folder), dtype, "", gpu_components, device)

    folder = _local_folder(model)
    if folder is not None:
        _check_folder(model, folder, "local folder")
        return _load(str(folder), dtype, "", gpu_components, device)
    if _looks_like_path(model):
        raise ModelNotFound(model, [f"local folder {model!r}: no such folder"])

    offline = _offline("HF_HUB_OFFLINE")
    tried = [f"local folder {model!r}: no such folder"]
    try:
        return _load(model, dtype, cache_dir, gpu_components, device)
    except (OSError, ValueError) as exc:
        # huggingface_hub's not-found, gated and offline errors are OSErrors; diffusers raises
        # ValueError for a name that is neither a folder nor a valid id.
        where = f"cache {cache_dir!r}" if cache_dir else "the default cache"
        mode = "HF_HUB_OFFLINE=1, cache only" if offline else "download"
        tried.append(f"Hugging Face Hub {model!r} ({mode}, {where}): {_short(exc)}")
        raise ModelNotFound(model, tried) from exc

