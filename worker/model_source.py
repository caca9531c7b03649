"""Where the model comes from: a local folder, a Hugging Face id, or `modelscope:<id>`.

Resolving (and downloading) happens in the worker's parent process at boot, before any job is
taken and without torch, so a model that cannot be found stops the worker with a clear message
instead of failing jobs. The rendering process then loads the local folder.
"""
from __future__ import annotations

import os
from pathlib import Path

MODELSCOPE_PREFIX = "modelscope:"


class ModelNotFound(RuntimeError):
    """Raised when the model is neither a local pipeline folder nor downloadable from its hub."""


def _hint(model: str) -> str:
    return (f"Could not get the model {model!r}. Download it where the network allows "
            "(`zfarm fetch-model`, or `huggingface-cli download Tongyi-MAI/Z-Image-Turbo --local-dir DIR`) "
            "and point ZFARM_MODEL at that local folder (it must hold model_index.json).")


def resolve_model(model: str, cache_dir: str = "") -> str:
    """A local folder holding a diffusers pipeline for `model`, downloading it if needed."""
    model = model.strip()
    if not model:
        raise ModelNotFound("ZFARM_MODEL is empty. " + _hint("Tongyi-MAI/Z-Image-Turbo"))
    local = Path(model).expanduser()
    if local.exists() or model.startswith(("/", "./", "../", "~")):
        if not (local / "model_index.json").is_file():
            raise ModelNotFound(f"local model folder {str(local)!r} has no model_index.json. " + _hint(model))
        return str(local.resolve())
    if model.startswith(MODELSCOPE_PREFIX):
        repo_id = model[len(MODELSCOPE_PREFIX):]
        try:
            from modelscope import snapshot_download
        except ImportError as exc:
            raise ModelNotFound(f"modelscope is not installed ({exc}). " + _hint(model)) from exc
        try:
            path = snapshot_download(repo_id, cache_dir=cache_dir or None)
        except Exception as exc:  # modelscope raises many unrelated types for "not reachable"
            raise ModelNotFound(f"tried ModelScope {repo_id!r}: {type(exc).__name__}: {exc}. " + _hint(model)) from exc
    else:
        try:
            from huggingface_hub import snapshot_download
        except ImportError as exc:
            raise ModelNotFound(f"huggingface_hub is not installed ({exc}). " + _hint(model)) from exc
        try:
            path = snapshot_download(model, cache_dir=cache_dir or None,
                                     allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja",
                                                     "tokenizer*", "*/tokenizer*", "*/*.json", "*/*.safetensors"])
        except Exception as exc:  # huggingface_hub raises several types for offline / not found / auth
            raise ModelNotFound(f"tried Hugging Face {model!r} (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): "
                                f"{type(exc).__name__}: {exc}. " + _hint(model)) from exc
    if not (Path(path) / "model_index.json").is_file():
        raise ModelNotFound(f"downloaded {model!r} to {path} but it holds no model_index.json. " + _hint(model))
    return str(path)
