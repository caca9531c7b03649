"""Streamed weights page-locked in place (worker.engine.pinned_arena), on the CPU: the packing into one
page-aligned buffer, what it keeps of each tensor, and when the buffer is registered and released.
CUDA's registration itself needs a GPU: here it is a recorder, and bench/ runs the real one."""
from __future__ import annotations

import gc
import mmap

import pytest
import torch

from worker.engine import pinned_arena, specs


def module_with_shared_storage() -> torch.nn.Module:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3).to(torch.bfloat16),
                                 torch.nn.Linear(3, 3, bias=False).to(torch.float8_e4m3fn))
    module.register_buffer("rows_of_first_weight", module[0].weight.data[2:])  # a view: the same storage
    return module


def pin(module, calls):
    return pinned_arena.pin_in_place(module, register=lambda address, size: calls.append(("register", address, size)),
                                     unregister=lambda address: calls.append(("unregister", address)),
                                     check_pinned=False)


def test_every_host_tensor_moves_into_one_page_aligned_registered_buffer_with_its_values_and_views_kept():
    module = module_with_shared_storage()
    before = {name: t.detach().clone() for name, t in [*module.named_parameters(), *module.named_buffers()]}
    calls = []
    size = pin(module, calls)
    [(kind, address, registered)] = calls
    assert kind == "register" and registered == size and address % mmap.PAGESIZE == 0 and size % mmap.PAGESIZE == 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        assert tensor.dtype == before[name].dtype and tensor.shape == before[name].shape
        assert torch.equal(tensor.float(), before[name].float()), name
        assert address <= tensor.data_ptr() and tensor.data_ptr() + tensor.nbytes <= address + size, name
    # The view still views its weight: one storage, moved once.
    assert module.rows_of_first_weight.data_ptr() == module[0].weight.data_ptr() + 2 * 5 * 4
    assert module[0].weight.untyped_storage().data_ptr() == module.rows_of_first_weight.untyped_storage().data_ptr()
    assert isinstance(module[0].weight, torch.nn.Parameter)
    out = module[0](torch.ones(1, 5))
    assert torch.allclose(out, torch.ones(1, 5) @ before["0.weight"].t() + before["0.bias"])


def test_the_buffer_is_only_as_large_as_the_tensors_rounded_to_their_alignment_and_a_page():
    module = torch.nn.Linear(1000, 1000, bias=False)  # 4,000,000 bytes
    size = pin(module, [])
    assert size == -(-4_000_000 // mmap.PAGESIZE) * mmap.PAGESIZE


def test_the_buffer_is_unregistered_when_the_last_tensor_viewing_it_goes():
    calls = []

    def pinned_module():
        module = torch.nn.Linear(8, 8)
        pin(module, calls)
        return module

    module = pinned_module()
    weight = module.weight
    del module
    gc.collect()
    assert [call[0] for call in calls] == ["register"]
    del weight
    gc.collect()
    assert [call[0] for call in calls] == ["register", "unregister"] and calls[1][1] == calls[0][1]


def test_a_module_with_nothing_on_the_host_registers_nothing():
    calls = []
    assert pin(torch.nn.Linear(4, 4, device="meta"), calls) == 0 and calls == []


def test_the_pinned_arena_field_needs_weights_streamed_from_pinned_copies():
    assert specs.spec_for("fp8mm_fast_stream_pinned_compiled").pinned_arena
    with pytest.raises(ValueError, match="pinned_arena concerns weights streamed from pinned copies"):
        specs.spec_for("fp8mm_fast_compiled", {"pinned_arena": True})
    with pytest.raises(ValueError, match="pinned_arena concerns"):
        specs.spec_for("fp8mm_fast_stream_lowmem_compiled", {"pinned_arena": True})
    with pytest.raises(ValueError, match="choose one"):
        specs.spec_for("fp8mm_fast_stream_pinned_compiled", {"pinned_exact": True})
