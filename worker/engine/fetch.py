"""`python -m worker.engine.fetch` (`zfarm fetch-model`): put the weights in the cache before workers start.

Downloads the pipeline from Hugging Face or ModelScope into the cache (ZFARM_MODEL_CACHE, or the hub
library's default) exactly as a booting worker would (`worker.engine.model_source`), and prints its local
folder on stdout, the value to set as ZFARM_MODEL; progress and errors go to stderr, so
`export ZFARM_MODEL=$(zfarm fetch-model --bf16)` works.

The published transformer is float32 (two ~11 GiB shards). `--bf16` converts it once into a sibling
folder `<snapshot>-bf16`, shard by shard and tensor by tensor, so memory stays near one bf16 shard;
every other file is hard-linked (or symlinked across filesystems), not copied.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from shared.errors import FetchError
from shared.settings import Settings
from worker.engine import model_source

log = logging.getLogger("zfarm.fetch")

BF16_SUFFIX = "-bf16"
CONVERTED_COMPONENTS = ("transformer",)




def fetch(model: str, source: str, cache_dir: str) -> Path:
    """Local folder of the pipeline: downloaded (or found in the cache) the way a worker would."""
    if source == "modelscope" and not model.startswith(model_source.MODELSCOPE_PREFIX) \
            and not Path(model).expanduser().exists():
        model = model_source.MODELSCOPE_PREFIX + model
    try:
        return Path(model_source.resolve_model(model, cache_dir))
    except model_source.ModelNotFound as exc:
        raise FetchError(str(exc)) from exc


def _link(src: Path, dst: Path) -> None:
    """Hard link (survives the cache entry's deletion); symlink where the filesystem refuses."""
    target = src.resolve()  # hub caches hold symlinks into blobs/
    try:
        os.link(target, dst)
    except OSError:
        os.symlink(target, dst)


def convert_safetensors_to_bf16(src: Path, dst: Path) -> int:
    """Write `src` with its float32 tensors as bfloat16; return the bytes of tensor data written."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    converted, nbytes = {}, 0
    with safe_open(str(src), framework="pt") as shard:
        metadata = shard.metadata()
        # One float32 tensor at a time, so the peak is the bf16 shard plus the largest tensor.
        for name in shard.keys():
            tensor = shard.get_tensor(name)
            if tensor.dtype == torch.float32:
                tensor = tensor.to(torch.bfloat16)
            converted[name] = tensor
            nbytes += tensor.numel() * tensor.element_size()
    save_file(converted, str(dst), metadata=metadata)
    return nbytes


def _convert_component(src_dir: Path, dst_dir: Path) -> None:
    dst_dir.mkdir(parents=True)
    total_bytes = 0
    for src in sorted(src_dir.iterdir()):
        if src.suffix == ".safetensors":
            log.info("converting %s to bf16", src.name)
            total_bytes += convert_safetensors_to_bf16(src, dst_dir / src.name)
    for src in sorted(src_dir.iterdir()):
        if src.name.endswith(".safetensors.index.json"):
            index = json.loads(src.read_text())
            # Shard names stay, so the weight map stays; only the size halves.
            index.setdefault("metadata", {})["total_size"] = total_bytes
            (dst_dir / src.name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        elif src.suffix != ".safetensors":
            _link(src, dst_dir / src.name)


def _link_tree(src_dir: Path, dst_dir: Path) -> None:
    dst_dir.mkdir(parents=True)
    for src in sorted(src_dir.iterdir()):
        if src.is_dir():
            _link_tree(src, dst_dir / src.name)
        else:
            _link(src, dst_dir / src.name)


def to_bf16(pipeline_dir: Path, components: tuple[str, ...] = CONVERTED_COMPONENTS) -> Path:
    """The sibling `<pipeline_dir>-bf16`, made once: built under a temporary name, then renamed."""
    if pipeline_dir.name.endswith(BF16_SUFFIX):
        return pipeline_dir  # ZFARM_MODEL already names a converted folder
    out = pipeline_dir.with_name(pipeline_dir.name + BF16_SUFFIX)
    if out.is_dir():
        log.info("%s already exists: kept (delete it to convert again)", out)
        return out
    missing = [c for c in components if not (pipeline_dir / c).is_dir()]
    if missing:
        raise FetchError(f"{pipeline_dir} has no {', '.join(missing)} folder: is it a ZImagePipeline?")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
    partial.mkdir()
    try:
        for src in sorted(pipeline_dir.iterdir()):
            if src.name in components:
                _convert_component(src, partial / src.name)
            elif src.is_dir():
                _link_tree(src, partial / src.name)
            else:
                _link(src, partial / src.name)
    except OSError as exc:
        raise FetchError(f"could not write {partial}: {exc}") from exc
    partial.rename(out)
    return out


def parse_args(argv: list[str] | None, settings: Settings) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="zfarm fetch-model", description="Download the model weights into the cache ahead of time.")
    parser.add_argument("--model", default=settings.model,
                        help="Hugging Face id, modelscope:<id>, or a local folder (default: ZFARM_MODEL)")
    parser.add_argument("--source", choices=("hf", "modelscope"), default="hf",
                        help="hub to download a plain id from (default: hf)")
    parser.add_argument("--bf16", action="store_true",
                        help="also convert the float32 transformer to bf16 into <folder>-bf16")
    parser.add_argument("--cache-dir", default=settings.model_cache_dir,
                        help="download cache (default: ZFARM_MODEL_CACHE, else the hub's default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv, Settings.from_env())
    try:
        path = fetch(args.model, args.source, args.cache_dir)
        if args.bf16:
            path = to_bf16(path)
    except FetchError as exc:
        print(f"zfarm fetch-model: error: {exc}", file=sys.stderr)
        return 2
    log.info("set ZFARM_MODEL=%s", path)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
