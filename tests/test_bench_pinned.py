"""Pinned host memory of streamed profiles (bench/pinned.py) and the `pinned_exact` profile field."""
from __future__ import annotations

import re

import pytest
import torch

from bench import pinned
from shared.errors import ProfileError
from worker.engine import placement, specs, tiny

MIB = 2**20


def test_torchs_rounding_takes_the_next_power_of_two_and_the_threshold_keeps_large_blocks_exact():
    sizes = [3 * MIB, 1000, 40 * MIB + 1]
    assert pinned.pinned_bytes(sizes, None) == 4 * MIB + 1024 + 64 * MIB
    assert pinned.pinned_bytes(sizes, MIB) == 3 * MIB + 1024 + 40 * MIB + 1


def test_fusing_the_streamed_dits_projections_makes_fewer_tensors_of_the_same_bytes():
    bf16 = pinned.streamed_components("fp8mm_stream", tiny.TINY_TRANSFORMER, tiny.TINY_TEXT_ENCODER, 256)
    fast = pinned.streamed_components("fp8mm_fast_stream_compiled", tiny.TINY_TRANSFORMER,
                                      tiny.TINY_TEXT_ENCODER, 256)
    assert set(bf16) == set(fast) == {"transformer", "text_encoder"}
    assert len(fast["transformer"]) < len(bf16["transformer"])
    assert sum(fast["transformer"]) == sum(bf16["transformer"])


def test_the_full_size_fp8_profile_pins_about_half_again_its_bytes_unless_large_blocks_stay_exact():
    record = pinned.predict("fp8mm_fast_stream_compiled", tiny.FULL_TRANSFORMER, tiny.FULL_TEXT_ENCODER,
                            tiny.FULL_VOCAB)
    # 6.15 B DiT weights and 4.0 B text-encoder weights, nearly all stored in one byte each.
    assert 9.0 < record["exact_gib"] < 10.5
    assert record["pinned_default_gib"] > 1.4 * record["exact_gib"]
    assert record["pinned_exact_gib"] - record["exact_gib"] < 0.05
    assert record["saved_gib"] == pytest.approx(record["pinned_default_gib"] - record["pinned_exact_gib"], abs=0.011)


def test_only_profiles_holding_pinned_copies_are_predicted():
    assert pinned.keeps_pinned_copies(specs.spec_for("fp8mm_fast_stream_compiled"))
    assert pinned.keeps_pinned_copies(specs.spec_for("te_stream"))
    assert not pinned.keeps_pinned_copies(specs.spec_for("fp8mm_fast_stream_lowmem_compiled"))
    assert not pinned.keeps_pinned_copies(specs.spec_for("fp8mm_fast_compiled"))
    assert not pinned.keeps_pinned_copies(specs.spec_for("model_offload"))


def test_pinned_exact_adds_torchs_pinned_rounding_threshold_to_the_allocator_settings_already_there():
    before = torch._C._accelerator_getAllocatorSettings()
    torch._C._accelerator_setAllocatorSettings("expandable_segments:True")
    try:
        placement.pin_at_exact_sizes()
        placement.pin_at_exact_sizes()
        settings = torch._C._accelerator_getAllocatorSettings().split(",")
    finally:
        torch._C._accelerator_setAllocatorSettings(before)
    assert settings == ["expandable_segments:True", f"pinned_max_round_threshold_mb:{placement.PINNED_ROUND_MAX_MB}"]


def test_a_torch_that_refuses_the_pinned_setting_fails_the_profile_with_its_version_named(monkeypatch):
    def refuse(settings):  # what torch 2.11 does (seen on the GPU machine)
        raise ValueError("Unrecognized key 'pinned_max_round_threshold_mb' in Accelerator allocator config.")

    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", refuse)
    with pytest.raises(ProfileError, match=rf"pinned_exact: torch {re.escape(torch.__version__)} .*Unrecognized key"):
        placement.pin_at_exact_sizes()


def test_pinned_exact_is_refused_for_a_profile_that_streams_nothing():
    assert specs.spec_for("fp8mm_fast_stream_compiled", {"pinned_exact": True}).pinned_exact
    with pytest.raises(ValueError, match="pinned_exact concerns streamed weights"):
        specs.spec_for("fp8mm_fast_compiled", {"pinned_exact": True})
