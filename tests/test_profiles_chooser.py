"""The chooser reads the measured table: fastest fitting profile per class, host RAM included,
nothing unmeasured, and the step-down order for an out-of-memory retry."""
from __future__ import annotations

import pytest

from shared import profiles
from shared.settings import Settings
from worker.engine import detect


def run(profile, cap, s, peak, rss, max_px=1024 * 1024, ok=True):
    return {"profile": profile, "cap_gib": cap, "ok": ok, "s_per_image": s, "peak_reserved_gib": peak,
            "host_rss_gib": rss, "max_pixels": max_px}


TABLE = {"runs": [
    run("resident_compiled", None, 0.9, 22.0, 10.0, 4194304),
    run("te_fp8_resident_compiled", 23, 1.0, 18.7, 12.0, 2359296),
    run("fp8_both_resident", 15, 1.7, 11.5, 18.0),
    run("te_stream_fp8", 11, 2.5, 7.9, 20.0),
    run("group_stream", 7, 3.3, 2.2, 44.6),
    run("group_stream_lowmem", 7, 6.0, 2.2, 22.0),
    run("model_offload", 11, None, None, None, ok=False),
]}


@pytest.mark.parametrize("vram_class, expected", [
    (80, "resident_compiled"), (24, "te_fp8_resident_compiled"), (16, "fp8_both_resident"),
    (12, "te_stream_fp8"), (8, "group_stream")])
def test_each_class_gets_the_fastest_profile_measured_under_its_cap(vram_class, expected):
    assert profiles.choose(TABLE, vram_class).profile == expected


def test_a_run_that_peaked_within_half_a_gib_of_the_cap_is_never_chosen():
    # too_tight is the fastest run at cap 11 but peaked at 10.8 GiB of 11; a 16 GB card has room for it.
    table = {"runs": TABLE["runs"] + [run("too_tight", 11, 0.1, 10.8, 5.0)]}
    assert all(c.profile != "too_tight" for c in profiles.candidates(table, 12))
    assert profiles.choose(table, 16).profile == "too_tight"


def test_an_uncapped_run_counts_only_for_the_card_it_ran_on():
    assert [c.profile for c in profiles.candidates(TABLE, 48)][0] == "te_fp8_resident_compiled"
    assert profiles.choose(TABLE, 24).max_pixels == 2359296


def test_a_profile_measured_under_several_caps_speaks_for_a_class_through_its_largest_fitting_cap():
    table = {"runs": [run("fast", 23, 0.611, 16.0, 12.0, 1792 * 1792),
                      run("fast", None, 0.615, 16.0, 12.0, 2048 * 2048)]}
    on_80 = profiles.choose(table, 80)
    assert (on_80.measured_cap_gib, on_80.max_pixels, on_80.s_per_image) == (None, 2048 * 2048, 0.615)
    on_24 = profiles.choose(table, 24)
    assert (on_24.measured_cap_gib, on_24.max_pixels) == (23, 1792 * 1792)


def test_host_ram_is_part_of_the_choice():
    # group_stream pins a second copy in host memory (44.6 GiB): a 32 GiB box gets the low-RAM variant.
    assert profiles.choose(TABLE, 8, ram_gib=32).profile == "group_stream_lowmem"
    assert profiles.choose(TABLE, 8, ram_gib=64).profile == "group_stream"


def test_a_class_with_no_fitting_measurement_is_refused_with_the_reason():
    with pytest.raises(profiles.ProfileError, match="no measured profile fits class 8g"):
        profiles.choose(TABLE, 8, ram_gib=16)
    assert profiles.choose({"runs": []}, profiles.CPU_CLASS).profile == "cpu"


def test_a_failed_or_unmeasured_run_is_never_chosen():
    assert all(c.profile != "model_offload" for c in profiles.candidates(TABLE, 80))


def test_a_forced_profile_is_taken_on_the_users_word():
    assert profiles.choose(TABLE, 24, forced="group_stream").profile == "group_stream"


def test_out_of_memory_steps_down_to_a_profile_that_needs_less_memory():
    lower = profiles.step_down(TABLE, 24, "te_fp8_resident_compiled")
    assert lower.profile == "fp8_both_resident" and lower.peak_reserved_gib < 18.7
    assert profiles.step_down(TABLE, 8, "group_stream") is None or \
        profiles.step_down(TABLE, 8, "group_stream").peak_reserved_gib < 2.2


@pytest.mark.parametrize("total_gib, vram_class", [(11.76, 12), (23.99, 24), (79.19, 80), (15.6, 16), (7.8, 8),
                                                   (47.5, 48), (5.8, None)])
def test_a_card_belongs_to_the_largest_class_its_memory_reaches(total_gib, vram_class):
    assert profiles.class_for_vram(total_gib) == vram_class


def test_the_vram_override_sets_class_cap_and_profile_on_a_gpu(tmp_path):
    gpus = [detect.GpuInfo("NVIDIA H100 80GB HBM3", 79.19, "9.0")]
    boot = detect.detect(Settings(vram_gb=12), TABLE, gpus=gpus)
    assert (boot.vram_class, boot.cap_gib, boot.choice.profile, boot.device) == (12, 11.0, "te_stream_fp8", "cuda")
    boot = detect.detect(Settings(), TABLE, gpus=gpus)
    assert (boot.vram_class, boot.cap_gib, boot.choice.profile) == (80, None, "resident_compiled")


def test_without_a_gpu_the_override_sets_only_the_class_and_the_render_stays_on_the_cpu():
    boot = detect.detect(Settings(vram_gb=24), TABLE, gpus=[])
    assert (boot.vram_class, boot.device, boot.cap_gib) == (24, "cpu", None)
    assert detect.detect(Settings(), TABLE, gpus=[]).vram_class == "cpu"


def test_the_committed_table_has_a_measured_choice_for_every_gpu_class():
    table = profiles.load_table()
    assert table["measured"]["device"].startswith("NVIDIA")
    for row in profiles.class_table(table):
        assert row["profile"], row
        assert row["vram_class"] == "cpu" or row["peak_reserved_gib"] <= row["cap_gib"] - profiles.HEADROOM_GIB


def fidelity(psnr_db):
    return {"reference": "resident@none", "psnr_db_min": psnr_db, "rel_l2_mean": 0.01, "max_abs_8bit": 10,
            "visibly_different": psnr_db < 40.0}


def lossy(row, psnr_db=None):
    return dict(row, lossy=True, **({"fidelity": fidelity(psnr_db)} if psnr_db is not None else {}))


def test_a_lossy_profile_is_a_class_default_only_once_its_images_were_compared_and_passed():
    exact = run("resident_compiled", None, 0.95, 22.0, 10.0, 4194304)
    never_compared = lossy(run("fp8_fast", None, 0.5, 15.0, 10.0, 4194304))
    visibly_different = lossy(run("fp8_faster", None, 0.4, 15.0, 10.0, 4194304), psnr_db=39.5)
    assert profiles.choose({"runs": [exact, never_compared, visibly_different]}, 80).profile == "resident_compiled"
    passed = lossy(run("fp8_ok", None, 0.7, 15.0, 10.0, 4194304), psnr_db=44.9)
    chosen = profiles.choose({"runs": [exact, never_compared, visibly_different, passed]}, 80)
    assert (chosen.profile, chosen.lossy, chosen.psnr_db_min) == ("fp8_ok", True, 44.9)


def test_allowing_lossy_profiles_admits_the_unmeasured_and_the_visibly_different():
    rows = [run("resident_compiled", None, 0.95, 22.0, 10.0), lossy(run("fp8_faster", None, 0.4, 15.0, 10.0), 39.5)]
    assert profiles.choose({"runs": rows}, 80, allow_lossy=True).profile == "fp8_faster"
    assert profiles.step_down({"runs": rows}, 80, "resident_compiled") is None
    assert profiles.step_down({"runs": rows}, 80, "resident_compiled", allow_lossy=True).profile == "fp8_faster"


def test_a_forced_profile_is_honoured_whether_or_not_it_is_lossy():
    rows = [run("resident_compiled", None, 0.95, 22.0, 10.0), lossy(run("fp8_faster", None, 0.4, 15.0, 10.0))]
    assert profiles.choose({"runs": rows}, 80, forced="fp8_faster").s_per_image == 0.4


def test_the_error_for_a_class_left_without_a_faithful_profile_names_the_setting_that_admits_the_rest():
    with pytest.raises(profiles.ProfileError, match="ZFARM_ALLOW_LOSSY=1"):
        profiles.choose({"runs": [lossy(run("fp8_only", 7, 2.0, 3.0, 10.0))]}, 8)


def test_speeds_within_five_percent_count_as_equal_and_the_larger_image_size_wins():
    small = run("fast_small", 15, 0.748, 12.0, 12.0, 1280 * 1280)
    large = run("fast_large", 23, 0.765, 15.4, 12.0, 1536 * 1536)
    assert profiles.choose({"runs": [small, large]}, 24).profile == "fast_large"
    slower_large = run("slow_large", 23, 0.80, 15.4, 12.0, 1536 * 1536)
    assert profiles.choose({"runs": [small, slower_large]}, 24).profile == "fast_small"


def test_the_worker_passes_the_allow_lossy_setting_to_the_chooser():
    rows = [run("resident_compiled", None, 0.95, 22.0, 10.0), lossy(run("fp8_faster", None, 0.4, 15.0, 10.0))]
    gpus = [detect.GpuInfo("NVIDIA H100 80GB HBM3", 79.19, "9.0")]
    strict = detect.detect(Settings.from_env({}), {"runs": rows}, gpus=gpus)
    loose = detect.detect(Settings.from_env({"ZFARM_ALLOW_LOSSY": "1"}), {"runs": rows}, gpus=gpus)
    assert (strict.choice.profile, loose.choice.profile) == ("resident_compiled", "fp8_faster")
