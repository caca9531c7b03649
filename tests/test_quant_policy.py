"""Which layers a lossy profile quantises (worker.engine.policy), the fp8 recipes (worker.engine.fp8_recipes)
and the hostile model (worker.engine.hostile), on the CPU: the default policy is the old selection, each
safer one keeps more blocks in bf16, per-row scales survive outlier tokens and zero rows where per-tensor
scales do not, and on the hostile model the naive recipe fails the quality gate while the shipped one passes."""
from __future__ import annotations

import re

import pytest
import torch

from shared import calibration
from shared.settings import Settings
from worker.engine import fp8, fp8_recipes, hostile, pipeline, placement, policy, quality, specs


@pytest.fixture(scope="module")
def tiny_pipe(tiny_dir):
    return pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")


@pytest.fixture(scope="module")
def hostile_pipe(hostile_dir):
    return pipeline.load_pipeline(str(hostile_dir), torch.float32, device="cpu")


def selected(model, pattern: re.Pattern) -> list[str]:
    return [name for name, module in model.named_modules() if fp8._convertible(name, module, pattern)]


def test_the_blocks_policy_quantises_exactly_the_layers_the_fp8_targets_did(tiny_pipe, hostile_pipe):
    for dit in (tiny_pipe.transformer, hostile_pipe.transformer):
        assert selected(dit, policy.pattern(dit, "blocks")) == selected(dit, fp8.DIT_TARGETS)
    te = tiny_pipe.text_encoder
    assert selected(te, policy.pattern(te, "blocks")) == selected(te, fp8.TEXT_ENCODER_TARGETS) != []


def test_each_safer_policy_keeps_more_blocks_in_bf16_and_the_last_keeps_them_all(hostile_pipe):
    dit = hostile_pipe.transformer
    blocks = {name: policy.quantised_blocks(dit, name) for name in policy.POLICIES}
    assert blocks["blocks"] == {"noise_refiner": [0], "context_refiner": [0], "layers": [0, 1, 2, 3, 4, 5]}
    assert blocks["edges"] == {"noise_refiner": [], "context_refiner": [], "layers": [1, 2, 3, 4]}
    assert blocks["half"] == {"noise_refiner": [], "context_refiner": [], "layers": [1, 2]}
    assert all(not indices for indices in blocks["bf16"].values())
    counts = [len(selected(dit, policy.pattern(dit, name))) for name in policy.POLICIES]
    assert counts[0] > counts[1] > counts[2] > counts[3] == 0
    assert [policy.safer(name) for name in policy.POLICIES] == ["edges", "half", "bf16", None]


def test_no_policy_ever_quantises_embedders_adaln_the_final_layer_or_norms(hostile_pipe):
    dit = hostile_pipe.transformer
    names = selected(dit, policy.pattern(dit, "blocks"))
    assert names and all(re.search(r"\.(attention|feed_forward)\.", n) for n in names)
    assert not any(k in n for n in names for k in ("embedder", "adaLN", "final_layer", "norm"))


def test_layerwise_casting_skips_the_blocks_a_policy_keeps(tiny_pipe):
    te = tiny_pipe.text_encoder
    kept = policy.kept_patterns(te, "edges")
    last = len(te.layers) - 1
    assert any(re.search(p, "layers.0.self_attn.q_proj") for p in kept)
    assert any(re.search(p, f"layers.{last}.mlp.up_proj") for p in kept)
    assert policy.kept_patterns(te, "blocks") == ()


def test_a_profile_whose_policy_quantises_nothing_is_lossless_unless_its_attention_is_not():
    assert specs.is_lossy(specs.spec_for("fp8mm_compiled"))
    assert not specs.is_lossy(specs.spec_for("fp8mm_compiled", {"quant_policy": "bf16"}))
    assert specs.is_lossy(specs.spec_for("fp8mm_fast_qk_compiled", {"quant_policy": "bf16"}))  # cuDNN attention
    assert specs.lossy_on("cpu_fp8", "cpu") and not specs.lossy_on("fp8mm_compiled", "cpu")
    with pytest.raises(ValueError, match="unknown quantisation policy"):
        specs.spec_for("fp8mm_compiled", {"quant_policy": "most"})


def test_the_emulated_row_wise_recipe_computes_what_torch_scaled_mm_computes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(5, 64)
    emulated = fp8_recipes.EmulatedFp8Linear.from_linear(linear, torch.float32, False)
    native = fp8.Fp8Linear.from_linear(linear, torch.float32, True)   # torch._scaled_mm runs on the CPU too
    assert torch.allclose(emulated(x), native(x), rtol=1e-4, atol=1e-4)


def test_one_outlier_token_flattens_every_other_token_under_a_per_tensor_scale_but_not_per_row():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 64, bias=False)
    x = torch.randn(32, 64) * 0.03
    x[7, 3] = hostile.PEAK
    reference = linear(x)[torch.arange(32) != 7]
    per_row = fp8_recipes.EmulatedFp8Linear.from_linear(linear, torch.float32, False)(x)[torch.arange(32) != 7]
    per_tensor = fp8_recipes.PerTensorFp8Linear(linear, torch.float32)(x)[torch.arange(32) != 7]

    def error(out):
        return float((out - reference).detach().norm() / reference.detach().norm())

    assert error(per_row) < 0.05
    assert error(per_tensor) > 0.9   # the ordinary tokens round to zero


def test_an_all_zero_row_passes_the_floored_row_scale_and_an_all_zero_tensor_turns_the_naive_recipe_nan():
    linear = torch.nn.Linear(32, 16)
    x = torch.randn(4, 32)
    x[2] = 0
    out = fp8_recipes.EmulatedFp8Linear.from_linear(linear, torch.float32, False)(x)
    assert torch.isfinite(out).all() and torch.allclose(out[2], linear.bias, atol=1e-6)
    naive = fp8_recipes.PerTensorFp8Linear(linear, torch.float32)
    assert torch.isfinite(naive(x)).all()
    assert torch.isnan(naive(torch.zeros(4, 32))).all()


def test_the_hostile_model_feeds_mlp_inputs_of_about_6_6e4_and_all_zero_rows(hostile_pipe):
    hostile_pipe.set_progress_bar_config(disable=True)
    with hostile.LinearInputs(hostile_pipe.transformer) as seen:
        hostile_pipe(prompt="a red lantern on a stone bridge", height=256, width=256, num_inference_steps=1,
                     guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(0))
    assert 0.9 * hostile.PEAK <= seen.mlp_max_abs <= 1.1 * hostile.PEAK
    assert seen.other_max_abs < 100        # only the feed-forward inputs are hostile
    assert seen.zero_rows > 0


def render_probes(model_dir, profile: str, probe_set) -> dict:
    pipe = pipeline.load_pipeline(str(model_dir), torch.float32, device="cpu")
    placement.apply_profile(pipe, profile, "cpu")
    pipe.set_progress_bar_config(disable=True)
    return {p.id: pipe(prompt=p.prompt, height=probe_set.size_px, width=probe_set.size_px,
                       num_inference_steps=probe_set.steps, guidance_scale=0.0,
                       generator=torch.Generator("cpu").manual_seed(p.seed)).images[0]
            for p in probe_set.probes}


def test_on_the_hostile_model_the_naive_recipe_fails_the_gate_and_the_shipped_recipe_passes(hostile_dir):
    probe_set = calibration.load_probes(2, 256, 8)
    thresholds = calibration.Thresholds.from_settings(Settings.from_env({}))   # the shipped defaults
    reference = render_probes(hostile_dir, "cpu", probe_set)

    def verdict(profile):
        images = render_probes(hostile_dir, profile, probe_set)
        return calibration.judge([{"id": k, **quality.compare(images[k], reference[k])} for k in reference],
                                 thresholds)

    shipped, naive = verdict("cpu_fp8"), verdict("cpu_fp8_naive")
    assert shipped["passed"] and shipped["psnr_db_min"] > thresholds.psnr_db + 5
    assert not naive["passed"] and naive["psnr_db_mean"] < thresholds.psnr_db
