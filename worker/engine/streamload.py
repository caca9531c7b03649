"""Loading a model from its .safetensors files one tensor at a time, into the form and place it will
keep, without a host copy of the whole model.

diffusers and transformers load a component whole in the load dtype before a profile converts it: the
bf16 DiT alone is 11.5 GiB of host memory, more than a 16 GB host can give beside the rest, and their
memory-mapped reads count the checkpoint's pages into the process's resident memory as they are
touched. Here the model is built on the meta device (no memory), each file's header is parsed, and each
tensor is read with plain file reads into a buffer of its own size, cast to the load dtype, and put
where it will live: target Linear layers quantised on the work device (the GPU) by a caller's
`convert`, everything else moved to its device as is. The host holds one tensor at a time (and the
page cache, which the kernel may reclaim), plus whatever the caller keeps on the host.

The safetensors format: an 8-byte little-endian header length, a JSON header mapping each tensor name
to its dtype, shape and byte range in the data section that follows.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from shared.errors import CheckpointError

log = logging.getLogger(__name__)

# safetensors dtype codes.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# A header larger than this is not a safetensors header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100 * 2**20
# The files diffusers (diffusion_pytorch_model) and transformers (model) write, whole or sharded.
CHECKPOINT_NAMES = ("diffusion_pytorch_model", "model")


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a .safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: str
    offset: int   # from the start of the file
    nbytes: int


def read_header(path: str) -> list[StoredTensor]:
    """The tensors of one .safetensors file, in the order their bytes lie in it."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: a header of {length} bytes is not a safetensors header")
            header = json.loads(fh.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the safetensors header ({exc})") from exc
    base = 8 + length
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, which this loader "
                                  f"does not read (known: {', '.join(DTYPES)})")
        start, end = info["data_offsets"]
        tensors.append(StoredTensor(name, DTYPES[info["dtype"]], tuple(info["shape"]), path, base + start, end - start))
    return sorted(tensors, key=lambda t: t.offset)


def read_tensor(fh, stored: StoredTensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor's bytes read from the open (unbuffered) file `fh`: into the front of the uint8 CPU
    tensor `into` (a staging buffer: the result views it), or into a CPU tensor of its own."""
    data = torch.empty(stored.nbytes, dtype=torch.uint8) if into is None else into[:stored.nbytes]
    view = memoryview(data.numpy()) if stored.nbytes else memoryview(b"")
    fh.seek(stored.offset)
    done = 0
    while done < stored.nbytes:
        n = fh.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{stored.path}: file ends inside tensor {stored.name!r}")
        done += n
    return data.view(stored.dtype).reshape(stored.shape)


def checkpoint_files(folder: str) -> list[str]:
    """The .safetensors files of one component folder: those its index names, or its single file."""
    for stem in CHECKPOINT_NAMES:
        index = os.path.join(folder, f"{stem}.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            return [os.path.join(folder, shard) for shard in shards]
        single = os.path.join(folder, f"{stem}.safetensors")
        if os.path.exists(single):
            return [single]
    raise CheckpointError(f"{folder}: no {' or '.join(n + '.safetensors' for n in CHECKPOINT_NAMES)} "
                          "(nor a sharded index of one)")


def _model_key(name: str, keys: set[str], prefix: str) -> str | None:
    """The model's name for a checkpoint tensor: the same, or with the base model's prefix ("model.")
    taken off or put on, as transformers does when a checkpoint was saved with or without its head."""
    if name in keys:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in keys:
        return name[len(prefix) + 1:]
    if prefix and f"{prefix}.{name}" in keys:
        return f"{prefix}.{name}"
    return None


def _keeps_float32(key: str, keep: Iterable[str]) -> bool:
    parts = key.split(".")
    return any(m in parts for m in keep)


def _put(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def load_into(model: torch.nn.Module, files: list[str], dtype: torch.dtype, device,
              convert: Callable[[torch.Tensor, torch.Tensor | None], torch.nn.Module] | None = None,
              targets: Iterable[str] = (), work_device=None) -> torch.nn.Module:
    """Fill `model`, built on the meta device, with the tensors of `files`, one at a time.

    Floating-point tensors are cast to `dtype` (float32 for the modules the model keeps in float32);
    others keep their type. Each Linear layer named in `targets` (which then need `convert`) is replaced by
    `convert(weight, bias)`, called with the weight on `work_device` (default: `device`) in `dtype` and
    the bias on `device`; whatever it returns is the layer, where it put it. Every other tensor goes to
    `device`. Buffers the model made itself (not in the checkpoint) are moved to `device`. Tensors the
    model does not have are skipped; a parameter or buffer that no file holds raises CheckpointError.
    Returns the model, in eval mode."""
    device = torch.device(device)
    work_device = torch.device(work_device) if work_device is not None else device
    targets = set(targets)
    state = model.state_dict(keep_vars=True)
    keys = set(state)
    needed = {key for key, t in state.items() if t.is_meta}  # not buffers the model computed itself
    prefix = getattr(model, "base_model_prefix", "") or ""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    target_of = {f"{name}.{leaf}": name for name in targets for leaf in ("weight", "bias")}
    stored: list[tuple[str, StoredTensor, torch.device]] = []
    skipped = 0
    for path in files:
        for tensor in read_header(path):
            key = _model_key(tensor.name, keys, prefix)
            if key is None:
                skipped += 1
            else:
                to = work_device if key in target_of and key.endswith(".weight") else device
                stored.append((key, tensor, to))
    # Target biases first (small): each target layer is then built as soon as its weight is read.
    stored.sort(key=lambda item: not (item[0] in target_of and item[0].endswith(".bias")))
    # Tensors bound off the host (the GPU) pass through one staging buffer, reused: the host holds the
    # largest of them, whatever the allocator would make of a buffer per tensor.
    staging_bytes = max((t.nbytes for _, t, to in stored if to.type != "cpu"), default=0)
    staging = torch.empty(staging_bytes, dtype=torch.uint8) if staging_bytes else None
    biases: dict[str, torch.Tensor] = {}
    filled: set[str] = set()
    handles: dict[str, object] = {}
    with contextlib.ExitStack() as files_open:
        for key, tensor, to in stored:
            fh = handles.get(tensor.path)
            if fh is None:
                fh = handles[tensor.path] = files_open.enter_context(open(tensor.path, "rb", buffering=0))
            # A copy to a device completes before `.to` returns, so the staging buffer is free again after it.
            value = read_tensor(fh, tensor, staging if to.type != "cpu" else None).to(to)
            if value.is_floating_point():
                value = value.to(torch.float32 if _keeps_float32(key, keep) else dtype)
            layer = target_of.get(key)
            if layer is None:
                _put(model, key, value)
            elif key.endswith(".bias"):
                biases[layer] = value
            else:
                parent_name, _, child = layer.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                bias = biases.pop(layer, None)
                if getattr(parent, child).bias is not None and bias is None:
                    raise CheckpointError(f"{tensor.path}: layer {layer!r} has a bias that no file holds")
                setattr(parent, child, convert(value, bias))
            filled.add(key)
            del value
    missing = sorted(needed - filled, key=list(state).index)
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) of {type(model).__name__} are in no file of "
                              f"{sorted({os.path.dirname(f) for f in files})}: {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""))
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    if skipped:
        log.debug("skipped %d checkpoint tensor(s) %s does not have", skipped, type(model).__name__)
    return model.eval()
