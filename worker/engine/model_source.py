"""Where the model comes from: a local folder, a Hugging Face id, or `modelscope:<id>`.

The one owner of finding the model. Resolving (and downloading) happens in the worker's parent
process at boot, before any job is taken and without torch, so a model that cannot be found stops
the worker with a clear message instead of failing jobs; `worker.engine.pipeline` then loads the folder.
"""
from __future__ import annotations

import hashlib
import os
import re
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


# A file up to this size is hashed whole for the revision; a larger one by its safetensors header and
# REVISION_SAMPLES evenly spaced pieces of REVISION_SAMPLE_BYTES, so the full model's 20 GB are not read.
REVISION_WHOLE_BYTES = 256 * 2**20
REVISION_SAMPLES = 16
REVISION_SAMPLE_BYTES = 2**20
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def model_revision(folder: str | Path) -> str:
    """What names a model's weights for the quality gate (references and results are kept by it): the
    Hugging Face snapshot's commit when the folder is one ("hf-<commit>"), else a hash of the folder's
    configuration, tokenizer and weight files ("sha-<16 hex>"). Any edit of a config, a header or the
    weights a sample reaches gives another revision; a tiny test model has one like any other."""
    folder = Path(folder).expanduser().resolve()
    if folder.parent.name == "snapshots" and _COMMIT.match(folder.name):
        return f"hf-{folder.name}"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder))):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        size = path.stat().st_size
        digest.update(str(size).encode() + b"\0")
        with open(path, "rb") as fh:
            if size <= REVISION_WHOLE_BYTES:
                digest.update(fh.read())
                continue
            if path.suffix == ".safetensors":
                header_len = int.from_bytes(fh.read(8), "little")
                digest.update(fh.read(min(header_len, REVISION_WHOLE_BYTES)))
            for i in range(REVISION_SAMPLES):
                fh.seek(size * i // REVISION_SAMPLES)
                digest.update(fh.read(REVISION_SAMPLE_BYTES))
    return f"sha-{digest.hexdigest()[:16]}"


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)
