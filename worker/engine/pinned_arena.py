"""Streamed weights page-locked where they lie: every tensor of a module moved into one host buffer
that is registered with CUDA (cudaHostRegister) as it is, at its exact size, with no second copy.

diffusers' group offload copies blocks to the GPU from pinned host memory. Left to itself it asks
torch for a pinned copy of each tensor, and torch's pinned allocator rounds every block up to a power
of two, which costs the small-card profiles about half again their weights in host RAM
(`python -m bench.pinned`; figures in docs/performance.md). Here the weights are pinned once, at their
size; the offload's `pin_memory()` then finds each tensor pinned already and keeps it.

torch's `pinned_max_round_threshold_mb` setting would stop the rounding (`pinned_exact`), but not every
torch release takes it; registering memory works on any CUDA torch.
"""
from __future__ import annotations

import mmap
import weakref

import torch

from shared.errors import PinError

PAGE_BYTES = mmap.PAGESIZE
ALIGN_BYTES = 256  # each storage starts on a boundary every dtype's elements and the copy engines like




def _cuda_register(address: int, size: int) -> None:
    cudart = torch.cuda.cudart()
    code = cudart.cudaHostRegister(address, size, 0)
    if int(code) != 0:
        raise PinError(f"cudaHostRegister of {size / 2**30:.2f} GiB failed with CUDA error {int(code)}")


def _cuda_unregister(address: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)


def _by_storage(module: torch.nn.Module) -> dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]]:
    """The module's host parameters and buffers, grouped by the storage they view (by its address)."""
    groups: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type == "cpu" and tensor.numel():
            storage = tensor.untyped_storage()
            groups.setdefault(storage.data_ptr(), (storage, []))[1].append(tensor)
    return groups


def pin_in_place(module: torch.nn.Module, register=_cuda_register, unregister=_cuda_unregister,
                 check_pinned: bool = True) -> int:
    """Move the storage of every host parameter and buffer of `module` into one page-aligned buffer,
    tensor views and shared storages kept as they were, and page-lock that buffer. Returns its size in
    bytes (0 where the module has nothing on the host). The buffer is unregistered and freed when the
    last tensor viewing it goes.

    Each storage is copied and its tensors re-pointed before the next is copied, and nothing here
    keeps the old storage after that, so the host holds the old and the new form of one storage at a
    time, not of the module. `register(address, size)` and `unregister(address)` default to CUDA's;
    `check_pinned` asks torch whether it sees the result as pinned (it must, or diffusers would pin a
    second copy)."""
    groups = _by_storage(module)
    if not groups:
        return 0
    offsets, size = {}, 0
    for address, (storage, _) in groups.items():
        offsets[address] = size
        size += -(-storage.nbytes() // ALIGN_BYTES) * ALIGN_BYTES
    size = -(-size // PAGE_BYTES) * PAGE_BYTES
    buffer = mmap.mmap(-1, size)  # page-aligned, and its pages are only taken as they are written
    arena = torch.frombuffer(buffer, dtype=torch.uint8)
    while groups:
        address, (storage, tensors) = groups.popitem()
        start = offsets[address]
        arena[start:start + storage.nbytes()].copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
        for tensor in tensors:
            tensor.data = torch.empty(0, dtype=tensor.dtype).set_(
                arena.untyped_storage(), start // tensor.element_size() + tensor.storage_offset(), tensor.shape,
                tensor.stride())
        del storage
    moved = tensors[0]
    register(arena.data_ptr(), size)
    weakref.finalize(buffer, unregister, arena.data_ptr())
    if check_pinned and not moved.is_pinned():
        raise PinError("the registered host buffer is not seen as pinned by torch "
                       f"{torch.__version__}; diffusers would pin a second copy of it")
    return size
