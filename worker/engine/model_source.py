"""Where the model comes from: a local folder, a Hugging Face id, or `modelscope:<id>`.

The one owner of finding the model. Resolving (and downloading) happens in the worker's parent
process at boot, before any job is taken and without torch, so a model that cannot be found stops
the worker with a clear message instead of failing jobs; `worker.engine.pipeline` then loads the folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from shared.errors import ModelNotFound

MODELSCOPE_PREFIX = "modelscope:"
PIPELINE_FILE = "model_index.json"
HINT = ("Point ZFARM_MODEL at a local folder holding a ZImagePipeline (model_index.json with transformer/, "
        "text_encoder/, vae/, tokenizer/, scheduler/), for example one written by `zfarm fetch-model` or "
        "`huggingface-cli download Tongyi-MAI/Z-Image-Turbo --local-dir DIR`, or use "
        "ZFARM_MODEL=modelscope:Tongyi-MAI/Z-Image-Turbo where the Hugging Face Hub is out of reach.")




def _not_found(model: str, tried: list[str]) -> ModelNotFound:
    return ModelNotFound(model, tried, HINT)


def _offline(env: str) -> bool:
    return os.environ.get(env, "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(model: str) -> bool:
    """A hub id is ORG/NAME; anything absolute, relative-dotted, home-based or deeper is a path."""
    return (model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or "\\" in model
            or model in (".", ".."))


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"


def _checked(model: str, folder: Path, source: str) -> str:
    if not (folder / PIPELINE_FILE).is_file():
        raise _not_found(model, [f"{source} {str(folder)!r}: the folder has no {PIPELINE_FILE}, "
                                    "so it is not a diffusers pipeline"])
    return str(folder.resolve())


def _modelscope_errors() -> tuple:
    """What a failed ModelScope look-up raises: HTTP and OS errors, and (modelscope >= 1.30) the
    hub client's own HubError, which derives from Exception only."""
    errors = [OSError, ValueError, RuntimeError]
    try:
        from modelscope_hub.errors import HubError
    except ImportError:
        return tuple(errors)
    return tuple(errors + [HubError])


def _from_modelscope(model: str, cache_dir: str) -> str:
    model_id = model[len(MODELSCOPE_PREFIX):].strip()
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise _not_found(model, [f"ModelScope {model_id!r}: the modelscope package is not installed ({exc})"])
    # ModelScope has no offline switch of its own; the Hub's one means "no network" here as well.
    offline = _offline("HF_HUB_OFFLINE") or _offline("MODELSCOPE_OFFLINE")
    try:
        folder = snapshot_download(model_id, cache_dir=cache_dir or None, local_files_only=offline)
    except _modelscope_errors() as exc:
        where = f"cache {cache_dir!r}" if cache_dir else "the default cache"
        mode = "offline, cache only" if offline else "download"
        raise _not_found(model, [f"ModelScope {model_id!r} ({mode}, {where}): {_short(exc)}"]) from exc
    return _checked(model, Path(folder), "ModelScope download")


def _from_hugging_face(model: str, cache_dir: str, tried: list[str]) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    offline = _offline("HF_HUB_OFFLINE")
    try:
        folder = snapshot_download(model, cache_dir=cache_dir or None, local_files_only=offline)
    except (OSError, ValueError, HfHubHTTPError) as exc:
        # Not found, gated, offline without a cached copy: each an OSError or an HTTP error.
        where = f"cache {cache_dir!r}" if cache_dir else "the default cache"
        mode = "HF_HUB_OFFLINE=1, cache only" if offline else "download"
        raise _not_found(model, tried + [f"Hugging Face Hub {model!r} ({mode}, {where}): {_short(exc)}"]) from exc
    return _checked(model, Path(folder), "Hugging Face download")


def resolve_model(model: str, cache_dir: str = "") -> str:
    """A local folder holding a diffusers pipeline for `model`, downloading it if needed.

    - an existing local folder is taken as is;
    - `modelscope:ORG/NAME` downloads through `modelscope.snapshot_download`;
    - anything else is a Hugging Face id (downloaded into `cache_dir`, or the hub's default cache).
    """
    model = model.strip()
    if not model:
        raise _not_found(model, ["nothing: ZFARM_MODEL is empty"])
    if model.startswith(MODELSCOPE_PREFIX):
        return _from_modelscope(model, cache_dir)
    local = Path(model).expanduser()
    if local.is_dir():
        return _checked(model, local, "local folder")
    tried = [f"local folder {model!r}: no such folder"]
    if _looks_like_path(model):
        raise _not_found(model, tried)
    return _from_hugging_face(model, cache_dir, tried)
