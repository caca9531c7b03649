"""The benchmark's fidelity check and the table it feeds: image comparison, the 40 dB rule, and a
fidelity record attached to the very run it compared."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench import profiles as bench
from shared import profiles


def test_identical_images_have_no_difference_and_a_one_percent_rms_difference_is_40_db():
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.2, 0.8, (64, 64, 3))
    same = bench.compare_images(reference, reference)
    assert (same["rel_l2"], same["psnr_db"], same["max_abs_8bit"]) == (0.0, float("inf"), 0)
    shifted = bench.compare_images(reference + 0.01, reference)
    assert shifted["psnr_db"] == pytest.approx(40.0)
    assert shifted["max_abs_8bit"] == 3


def save_run(root, label, images):
    folder = root / label
    folder.mkdir(parents=True)
    for seed, image in zip(bench.FIDELITY_SEEDS, images):
        np.save(folder / f"seed{seed}.npy", image)


def test_each_run_is_compared_with_the_bf16_reference_and_flagged_by_its_worst_seed(tmp_path):
    rng = np.random.default_rng(1)
    reference = [rng.uniform(0, 1, (32, 32, 3)) for _ in bench.FIDELITY_SEEDS]
    save_run(tmp_path, bench.REFERENCE_LABEL, reference)
    save_run(tmp_path, "close@none", [r + 0.003 for r in reference])
    save_run(tmp_path, "one_bad_seed@15", [reference[0] + 0.003, reference[1] + 0.02])
    records = {r["run"]: r for r in bench.fidelity(str(tmp_path))}
    assert set(records) == {"close@none", "one_bad_seed@15"}
    assert records["close@none"]["visibly_different"] is False
    assert records["close@none"]["psnr_db_min"] == pytest.approx(50.46, abs=0.01)
    assert records["one_bad_seed@15"]["visibly_different"] is True
    assert [s["seed"] for s in records["one_bad_seed@15"]["seeds"]] == list(bench.FIDELITY_SEEDS)


def test_fidelity_without_reference_images_says_which_run_to_make(tmp_path):
    with pytest.raises(SystemExit, match="resident@none"):
        bench.fidelity(str(tmp_path))


@pytest.mark.parametrize("profile, cap, overrides, batch, label", [
    ("fp8mm_compiled", None, {}, 1, "fp8mm_compiled@none"),
    ("fp8mm_compiled", 23.0, {"vae_compile": True}, 1, "fp8mm_compiled@23+vae_compile=True"),
    ("resident", 11.0, {}, 2, "resident@11+batch=2")])
def test_a_run_label_names_profile_cap_overrides_and_batch(profile, cap, overrides, batch, label):
    assert bench.run_label(profile, cap, overrides, batch) == label


def measured(profile, cap, s, spec_overrides=None, **extra):
    from worker.engine.specs import spec_for

    spec = {k: v for k, v in vars(spec_for(profile, spec_overrides)).items() if k != "description"}
    return {"profile": profile, "cap_gib": cap, "ok": True, "s_per_image": s, "peak_reserved_gib": 15.0,
            "host_rss_gib": 12.0, "max_pixels": 1024 * 1024, "spec": spec, "overrides": spec_overrides or {},
            "device": "NVIDIA H100 80GB HBM3", **extra}


def fidelity_record(run, psnr_db):
    return {"check": "fidelity", "run": run, "reference": "resident@none", "psnr_db_min": psnr_db,
            "rel_l2_mean": 0.01, "max_abs_8bit": 9, "visibly_different": psnr_db < 40}


def test_the_table_carries_each_runs_own_fidelity_and_leaves_a_rerun_uncompared(tmp_path):
    lines = [measured("fp8mm_compiled", None, 0.70), fidelity_record("fp8mm_compiled@none", 44.9),
             measured("fp8mm_compiled", 23.0, 0.76), fidelity_record("fp8mm_compiled@23", 38.0),
             measured("resident", None, 1.40),
             # A later run of the same profile and cap replaces the earlier one, and had no comparison.
             measured("fp8mm_compiled", 23.0, 0.75),
             measured("fp8mm_compiled", None, 0.60, batch=2)]
    raw = tmp_path / "runs.jsonl"
    raw.write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = bench.build_table([str(raw)], tmp_path / "table.json")
    rows = {(r["profile"], r["cap_gib"]): r for r in table["runs"]}
    assert rows[("fp8mm_compiled", None)]["fidelity"]["psnr_db_min"] == 44.9
    assert rows[("fp8mm_compiled", None)]["s_per_image"] == 0.70   # the batch-2 run is exploration
    assert "fidelity" not in rows[("fp8mm_compiled", 23.0)] and rows[("fp8mm_compiled", 23.0)]["lossy"] is True
    assert rows[("resident", None)]["lossy"] is False
    assert table["fidelity_rule"]["visible_below_psnr_db"] == bench.VISIBLE_PSNR_DB
    # The chooser: the compared fp8 run for 80 GB; the uncompared one is not a 24 GB default.
    assert profiles.choose(table, 80).profile == "fp8mm_compiled"
    with pytest.raises(profiles.ProfileError):
        profiles.choose(table, 24)


def test_a_run_recorded_before_a_spec_field_existed_still_counts_with_that_fields_default(tmp_path):
    old = measured("resident_compiled", None, 0.95)
    del old["spec"]["vae_compile"]
    raw = tmp_path / "runs.jsonl"
    raw.write_text(json.dumps(old) + "\n")
    table = bench.build_table([str(raw)], tmp_path / "table.json")
    assert [r["profile"] for r in table["runs"]] == ["resident_compiled"]


def test_the_comparison_can_be_limited_to_one_matrixs_runs(tmp_path):
    rng = np.random.default_rng(2)
    reference = [rng.uniform(0, 1, (16, 16, 3)) for _ in bench.FIDELITY_SEEDS]
    save_run(tmp_path, bench.REFERENCE_LABEL, reference)
    save_run(tmp_path, "from_an_earlier_matrix@none", reference)
    save_run(tmp_path, "fp8mm_compiled@23+vae_compile=True", reference)
    label = bench.run_label(*bench.parse_plan_item("fp8mm_compiled@23+vae_compile=true")[:2],
                            bench._parse_overrides(["vae_compile=true"]))
    assert [r["run"] for r in bench.fidelity(str(tmp_path), runs=[label])] == [label]


def test_a_run_recorded_with_a_spec_field_since_removed_still_counts(tmp_path):
    old = measured("resident_compiled", None, 0.95)
    old["spec"]["te_compile"] = False   # an option measured in an earlier version and dropped
    raw = tmp_path / "runs.jsonl"
    raw.write_text(json.dumps(old) + "\n")
    table = bench.build_table([str(raw)], tmp_path / "table.json")
    assert [r["profile"] for r in table["runs"]] == ["resident_compiled"]


def test_a_later_run_on_another_gpu_does_not_displace_the_tables_own_and_names_its_card_where_it_is_alone(
        tmp_path):
    h200 = {"device": "NVIDIA H200"}
    lines = [measured("resident", None, 1.39), measured("fp8mm_compiled", None, 0.73),
             measured("resident", None, 1.32, **h200), measured("fp8mm_compiled", 23.0, 0.74, **h200)]
    raw = tmp_path / "runs.jsonl"
    raw.write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = bench.build_table([str(raw)], tmp_path / "table.json")
    rows = {(r["profile"], r["cap_gib"]): r for r in table["runs"]}
    assert table["measured"]["device"] == "NVIDIA H100 80GB HBM3"
    resident, elsewhere = rows[("resident", None)], rows[("fp8mm_compiled", 23.0)]
    assert (resident["s_per_image"], resident["device"]) == (1.39, "NVIDIA H100 80GB HBM3")
    assert (elsewhere["s_per_image"], elsewhere["device"]) == (0.74, "NVIDIA H200")
