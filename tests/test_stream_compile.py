"""Compiled blocks under streaming (worker.engine.placement.compile_blocks_under_hooks), on the CPU with the tiny
model: the blocks compile beneath diffusers' group-offload hooks, draw what the eager model draws, and
share one set of graphs that serves other prompt lengths and sizes without compiling again."""
from __future__ import annotations

import pytest
import torch
from diffusers.hooks import apply_group_offloading
from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

from worker.engine import compile_modes, pipeline, placement, specs


def render(pipe, side: int = 128, prompt: str = "a lighthouse at dusk") -> torch.Tensor:
    out = pipe(prompt=prompt, height=side, width=side, num_inference_steps=2, guidance_scale=0.0,
               generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
    return torch.from_numpy(out)


def graphs_of_the_block_code() -> int:
    return len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(ZImageTransformerBlock.forward.__code__))


def test_blocks_compiled_beneath_the_offload_hooks_draw_the_eager_image_and_share_their_graphs(tiny_dir):
    pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    eager = render(pipe)
    torch._dynamo.reset()
    try:
        blocks = placement.compile_blocks_under_hooks(pipe.transformer)
        # As _place does for a streamed DiT; the CPU stands in for both ends (no CUDA stream here).
        apply_group_offloading(pipe.transformer, onload_device=torch.device("cpu"),
                               offload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1)
        compiled = render(pipe)
        graphs = graphs_of_the_block_code()
        assert blocks == sum(len(getattr(pipe.transformer, n)) for n in ("noise_refiner", "context_refiner", "layers"))
        # One graph per kind of call (image refiner, caption refiner, joint layers), not one per block.
        assert 1 <= graphs <= 3 < blocks
        assert (compiled - eager).abs().max().item() < 1e-4
        render(pipe, side=192, prompt="a red house on the river " * 10)
        assert graphs_of_the_block_code() == graphs
    finally:
        torch._dynamo.reset()


def test_a_block_compile_mode_reaches_torch_compile_and_an_unknown_one_is_refused(tiny_dir, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")
    placement.compile_blocks_under_hooks(pipe.transformer, **compile_modes.block_compile_args("tuned"))
    assert seen == [{"fullgraph": True, "options": {"coordinate_descent_tuning": True}}]
    with pytest.raises(ValueError, match="block compile mode"):
        specs.spec_for("fp8mm_fast_compiled", {"compile_mode": "max-autotune"})
