"""The text encoder's CUDA-graph path (worker.engine.text_encoder), on the CPU: what it computes equals what
ZImagePipeline's own encoding gives, and the calls it does not serve go to diffusers unchanged. The
graph capture itself needs a GPU; the GPU benchmark compares the images of a captured run with bf16
(bench/profiles.py fidelity check)."""
from __future__ import annotations

import pytest
import torch

from worker.engine import pipeline, specs, text_encoder

PROMPTS = ["a red fox in the snow, golden hour", "word " * 700, ""]   # short, truncated at 512 tokens, empty


@pytest.fixture
def pipe(tiny_dir):
    return pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")


def encode(pipe, prompt):
    embeds, _ = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False)
    return embeds


@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_graph_path_encodes_a_prompt_exactly_as_the_pipeline_does(pipe, prompt):
    reference = encode(pipe, prompt)
    runner = text_encoder.install(pipe)
    assert runner.graph is None   # no CUDA here: the same layers run eagerly
    ours = encode(pipe, prompt)
    assert len(ours) == 1 and ours[0].shape == reference[0].shape
    assert torch.equal(ours[0], reference[0])


def test_it_skips_the_last_layer_whose_output_the_pipeline_throws_away(pipe):
    runner = text_encoder.install(pipe)
    assert len(runner.layers) == len(pipe.text_encoder.layers) - 1


def test_several_prompts_at_once_still_go_through_diffusers_own_encoding(pipe):
    reference = encode(pipe, list(PROMPTS[:2]))
    text_encoder.install(pipe)
    ours = encode(pipe, list(PROMPTS[:2]))
    assert [e.shape for e in ours] == [e.shape for e in reference]
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))


def test_profiles_refuse_a_graph_of_a_text_encoder_whose_weights_move():
    with pytest.raises(ValueError, match="te_graph needs a resident text encoder"):
        specs.spec_for("group_stream", {"te_graph": True})


def test_cudnn_attention_is_refused_without_the_fused_processor_that_calls_it():
    with pytest.raises(ValueError, match="needs fuse_projections"):
        specs.spec_for("resident_compiled", {"attention": "cudnn"})
