"""Capabilities, not assumptions: what each architecture can do, what each profile needs, and a chooser
that takes only what the card can run and says why it left each other profile out."""
from __future__ import annotations

import json

import pytest

from producer.cli import main, profiles_report
from shared import archs, cards, profiles
from shared.errors import NoProfileFits, UsageError
from worker.engine import specs
from worker.engine.detect import GpuInfo, card_capabilities


@pytest.mark.parametrize("arch, has, lacks", [
    ("sm_75", {archs.INT8_MATMUL, archs.TRITON}, {archs.BF16, archs.TRITON_E4M3, archs.FP8_MATMUL}),
    ("sm_86", {archs.BF16, archs.INT8_MATMUL, archs.CUDNN_ATTENTION}, {archs.TRITON_E4M3, archs.FP8_MATMUL}),
    ("sm_89", {archs.BF16, archs.TRITON_E4M3, archs.FP8_MATMUL}, set()),
    ("sm_90", {archs.BF16, archs.TRITON_E4M3, archs.FP8_MATMUL, archs.CUDA_GRAPHS}, set()),
    # Row-wise fp8 matmul is refused by cuBLASLt on consumer Blackwell (pytorch#192707): not offered.
    ("sm_120", {archs.BF16, archs.TRITON_E4M3}, {archs.FP8_MATMUL}),
])
def test_each_architecture_offers_what_its_hardware_and_torch_allow(arch, has, lacks):
    caps = archs.capabilities(arch, "2.11.0+cu130", "3.6.0")
    assert has <= caps.features and not lacks & caps.features


def test_row_wise_fp8_matmul_needs_a_torch_recent_enough_for_the_architecture():
    assert not archs.capabilities("sm_89", "2.4.1", "3.0").meets(archs.FP8_MATMUL)
    assert archs.capabilities("sm_89", "2.5.0", "3.1").meets(archs.FP8_MATMUL)


def test_a_version_requirement_is_judged_against_the_installed_torch():
    caps = archs.capabilities("sm_90", "2.11.0+cu130", "3.6.0")
    assert caps.meets("torch>=2.6") and not caps.meets("torch>=2.13")


def test_without_triton_no_compiled_profile_is_offered():
    assert not archs.capabilities("sm_90", "2.11.0", "").meets(archs.TRITON)


@pytest.mark.parametrize("text, name", [("sm_86", "sm_86"), ("sm86", "sm_86"), ("8.6", "sm_86"), ("86", "sm_86"),
                                        ("SM_120", "sm_120")])
def test_an_architecture_is_named_in_any_usual_way(text, name):
    assert archs.parse_arch(text).name == name


def test_an_unknown_architecture_is_a_usage_error_naming_the_known_ones():
    with pytest.raises(UsageError, match="unknown GPU architecture 'sm_99'.*sm_86"):
        archs.parse_arch("sm_99")


def test_the_boot_reads_the_cards_capabilities_from_nvml_facts_and_package_versions():
    caps = card_capabilities(GpuInfo("NVIDIA GeForce RTX 3060", 11.7, "8.6"))
    assert caps.arch == "sm_86" and not caps.meets(archs.FP8_MATMUL) and caps.emulated_on == ""
    played = card_capabilities(GpuInfo("NVIDIA H100 80GB HBM3", 79.2, "9.0"), emulate_arch="sm_86")
    assert (played.arch, played.emulated_on) == ("sm_86", "sm_90") and not played.meets(archs.TRITON_E4M3)


# What profiles need
def test_an_fp8_matmul_profile_needs_fp8_tensor_cores_and_triton_e4m3_and_a_bf16_one_neither():
    fast = specs.requirements(specs.spec_for("fp8mm_fast_qk_compiled"))
    assert {archs.FP8_MATMUL, archs.TRITON_E4M3, archs.CUDNN_ATTENTION, archs.CUDA_GRAPHS} <= set(fast)
    plain = specs.requirements(specs.spec_for("resident_compiled"))
    assert set(plain) == {archs.CUDA, archs.BF16, archs.TRITON}


def test_every_profile_declares_what_it_needs_in_known_terms():
    for name, spec in specs.SPECS.items():
        for need in specs.requirements(spec):
            assert need in archs.CAPABILITIES or need.startswith(("torch>=", "triton>=")), (name, need)


# The chooser, on a table where the fastest profile needs fp8 and a slower one does not
TABLE = {"source": "test", "measured": {"torch": "2.11.0+cu130"}, "profiles": {"fast": "", "plain": "", "big": ""},
         "runs": [
             {"profile": "fast", "cap_gib": 23.0, "ok": True, "s_per_image": 0.6, "peak_reserved_gib": 16.0,
              "host_rss_gib": 12.5, "max_pixels": 2048 * 2048, "lossy": False, "device": "NVIDIA H100 80GB HBM3",
              "arch": "sm_90", "torch": "2.11.0+cu130", "stages_s": {"dit_loop": 0.5},
              "requires": ["bf16", "cuda", "fp8_matmul", "triton", "triton_e4m3"], "spec": {"transformer": "fp8mm"}},
             {"profile": "plain", "cap_gib": 23.0, "ok": True, "s_per_image": 1.05, "peak_reserved_gib": 22.0,
              "host_rss_gib": 10.2, "max_pixels": 1024 * 1024, "lossy": False, "device": "NVIDIA H100 80GB HBM3",
              "arch": "sm_90", "torch": "2.11.0+cu130", "stages_s": {"dit_loop": 0.9},
              "requires": ["bf16", "cuda", "triton"], "spec": {"transformer": "gpu"}},
             {"profile": "big", "cap_gib": None, "ok": True, "s_per_image": 0.5, "peak_reserved_gib": 40.0,
              "host_rss_gib": 10.0, "max_pixels": 2048 * 2048, "lossy": False, "device": "NVIDIA H100 80GB HBM3",
              "arch": "sm_90", "requires": ["bf16", "cuda"]},
         ]}


def test_an_ampere_card_gets_the_profile_it_can_run_and_hears_why_the_faster_one_was_left_out():
    caps = archs.capabilities("sm_86", "2.11.0", "3.6.0")
    found, excluded = profiles.assess(TABLE, 24, 32.0, caps=caps)
    assert [c.profile for c in found] == ["plain"]
    reasons = {e["profile"]: e["reason"] for e in excluded}
    assert reasons["fast"] == "needs fp8_matmul, triton_e4m3, which sm_86 does not offer"
    assert reasons["big"].startswith("measured only with 79 GiB")


def test_without_an_architecture_the_chooser_judges_no_card():
    assert profiles.choose(TABLE, 24, 32.0).profile == "fast"


def test_a_card_no_profile_suits_is_refused_with_the_reasons_counted():
    caps = archs.capabilities("sm_75", "2.11.0", "3.6.0")
    with pytest.raises(NoProfileFits, match=r"on sm_75 .*need bf16 \(not on sm_75\)"):
        profiles.choose(TABLE, 24, 32.0, caps=caps)


def test_the_step_down_order_is_every_other_candidate_fastest_first():
    chosen = profiles.choose(TABLE, 24, 32.0)
    assert [c.profile for c in profiles.fallbacks(TABLE, chosen, 32.0)] == ["plain"]


# zfarm profiles for a card that is not present
def test_zfarm_profiles_json_for_an_absent_card_gives_the_choice_its_needs_and_every_profile_left_out():
    report = profiles_report(TABLE, 24, 32, arch="sm_86")
    chosen = report["chosen"]
    assert chosen["profile"] == "plain" and chosen["requires"] == ["bf16", "cuda", "triton"]
    assert chosen["host_rss_gib"] == 10.2 and chosen["s_per_image"] == 1.05
    assert chosen["measured_on"] == "NVIDIA H100 80GB HBM3 (sm_90), torch 2.11.0+cu130, cap 23 GiB"
    assert {e["profile"] for e in report["excluded"]} == {"fast", "big"}
    # The cards of that arch and class, with a modelled speed labelled as one.
    expected = {e["card"]: e for e in chosen["expected"]}
    assert set(expected) == {"A10 24GB", "RTX 3090 24GB"} and all(e["model"] for e in expected.values())


def test_zfarm_profiles_for_a_named_card_takes_its_memory_and_architecture(monkeypatch, tmp_path, capsys):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(TABLE))
    monkeypatch.setenv("ZFARM_PROFILE_TABLE", str(path))
    assert main(["profiles", "--card", "RTX 3090", "--ram-gb", "32"]) == 0
    err = capsys.readouterr().err
    assert "RTX 3090 24GB (sm_86) runs profile plain" in err
    assert "expected on RTX 3090 24GB:" in err and "a model, not a measurement" in err
    assert "fast: needs fp8_matmul, triton_e4m3, which sm_86 does not offer" in err


def test_an_unknown_card_name_is_refused():
    with pytest.raises(UsageError, match="not a card zfarm knows"):
        profiles_report(TABLE, None, None, card_name="Voodoo 3")


# The speed model
def test_the_speed_model_gives_the_measuring_card_its_own_figure_and_a_slower_card_a_larger_one():
    row = TABLE["runs"][1]
    on_h100 = cards.expected_s_per_image(row, cards.find("NVIDIA H100 80GB HBM3"))
    on_3090 = cards.expected_s_per_image(row, cards.find("NVIDIA GeForce RTX 3090"))
    assert on_h100["s_per_image"] == pytest.approx(1.05, rel=0.01)
    assert on_3090["s_per_image"] > 10 * on_h100["s_per_image"] and on_3090["model"] is True


def test_a_streamed_profile_on_a_narrow_pcie_link_is_paced_by_its_copies():
    row = dict(TABLE["runs"][1], spec={"transformer": "fp8mm_stream", "text_encoder": "fp8_stream"}, s_per_image=1.5,
               stages_s={"dit_loop": 1.3})
    on_4060ti = cards.expected_s_per_image(row, cards.find("RTX 4060 Ti"))
    copies_s = (8 * cards.DIT_GIB["8bit"] + cards.TEXT_ENCODER_GIB["8bit"]) * 2**30 / (16e9 * cards.PCIE_EFFICIENCY)
    assert on_4060ti["s_per_image"] >= round(copies_s, 2) and "of weights over PCIe" in on_4060ti["basis"]


@pytest.mark.parametrize("reported, listed", [("NVIDIA A10", "A10 24GB"), ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
                                              ("Tesla T4", "T4 16GB"), ("NVIDIA GeForce RTX 4060 Ti", "RTX 4060 Ti 16GB"),
                                              ("NVIDIA H100 80GB HBM3", "H100 SXM 80GB")])
def test_a_card_is_found_by_the_name_cuda_reports(reported, listed):
    assert cards.find(reported).name == listed


# The shipped table's answers for the cards people run (the four machines of the low-VRAM recipe first)
@pytest.mark.parametrize("card, ram_gb, profile", [
    ("RTX 4090", 64, "fp8mm_fast_qk_compiled"),
    ("RTX 3090", 32, "int8mm_fast_compiled"),
    ("RTX 4060 Ti", 32, "fp8mm_both_fast_compiled"),
    ("RTX 3060", 16, "int8mm_fast_te_stream_pinned_compiled"),
    ("A10", 64, "int8mm_fast_compiled"),
    ("L4", 64, "fp8mm_fast_qk_compiled"),
    ("A100 80GB", 128, "int8mm_fast_compiled"),
    ("RTX 5090", 64, "int8mm_fast_compiled"),
])
def test_the_shipped_table_gives_each_card_a_profile_its_architecture_runs(card, ram_gb, profile):
    report = profiles_report(profiles.load_table(), None, ram_gb, card_name=card)
    chosen = report["chosen"]
    assert chosen["profile"] == profile
    caps = archs.capabilities(report["arch"], profiles.load_table()["measured"]["torch"], "bundled")
    assert not caps.missing(chosen["requires"])
    assert chosen["expected"] and chosen["expected"][0]["model"] is True


def test_the_rtx_3060_on_a_16_gb_host_gets_a_profile_whose_host_rss_is_at_most_14_gib():
    chosen = profiles_report(profiles.load_table(), None, 16, card_name="RTX 3060")["chosen"]
    assert chosen["host_rss_gib"] <= 14.0 and "emulating sm_86" in chosen["measured_on"]


def test_a_t4_is_refused_at_boot_saying_what_turing_lacks():
    report = profiles_report(profiles.load_table(), None, 32, card_name="T4")
    assert report["chosen"] is None and "need bf16 (not on sm_75)" in report["error"]


def test_the_cards_table_in_the_docs_is_the_one_the_shipped_table_gives():
    from pathlib import Path

    from bench import coverage

    repo = Path(__file__).resolve().parents[1]
    assert coverage.main(["--check", str(repo / "README.md"), "--check", str(repo / "docs" / "profiles.md")]) == 0
