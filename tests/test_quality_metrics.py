"""The quality gate's measurements and verdict (worker.engine.quality, shared.calibration), no model needed:
PSNR and SSIM on known cases, pure noise far below the thresholds, and a verdict made from stored metrics."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from shared import calibration
from shared.settings import Settings
from worker.engine import quality


def scene(side: int = 96) -> np.ndarray:
    """A structured 8-bit picture: gradients, a bright square and stripes."""
    y, x = np.mgrid[0:side, 0:side]
    image = np.stack([x * 255 / side, y * 255 / side, (x + y) * 127 / side], axis=-1)
    image[side // 4:side // 2, side // 4:side // 2] = 240
    image[:, ::8] = 20
    return image.astype(np.uint8)


def direct_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM computed window by window with a 2-D Gaussian: the textbook form, slow but plain."""
    taps = quality._gaussian_taps()
    window = np.outer(taps, taps)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a, b = quality.luminance(a), quality.luminance(b)
    n = len(taps)
    values = []
    for i in range(a.shape[0] - n + 1):
        for j in range(a.shape[1] - n + 1):
            pa, pb = a[i:i + n, j:j + n], b[i:i + n, j:j + n]
            ma, mb = (window * pa).sum(), (window * pb).sum()
            va, vb = (window * pa * pa).sum() - ma ** 2, (window * pb * pb).sum() - mb ** 2
            cov = (window * pa * pb).sum() - ma * mb
            values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_identical_images_score_the_identical_psnr_and_an_ssim_of_one():
    image = scene()
    assert quality.psnr_db(image, image) == calibration.PSNR_IDENTICAL_DB
    assert quality.ssim(image, image) == pytest.approx(1.0)


def test_psnr_of_a_uniform_five_level_shift_is_the_textbook_value():
    image = scene().astype(np.int16)
    shifted = np.clip(image + 5, 0, 255).astype(np.uint8)
    exact = 10 * np.log10(255 ** 2 / np.mean((shifted.astype(float) - image) ** 2))
    assert quality.psnr_db(shifted, image.astype(np.uint8)) == pytest.approx(exact)


def test_the_separable_ssim_equals_the_window_by_window_definition():
    rng = np.random.default_rng(0)
    a = scene(40)
    b = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
    assert quality.ssim(b, a) == pytest.approx(direct_ssim(b, a), abs=1e-9)


def test_pure_noise_against_a_picture_scores_far_below_every_threshold():
    settings = Settings.from_env({})
    noise = np.random.default_rng(1).integers(0, 256, scene().shape, dtype=np.uint8)
    measured = quality.compare(noise, scene())
    assert measured["psnr_db"] < settings.calibration_probe_psnr_db - 4
    assert measured["ssim"] < settings.calibration_probe_ssim / 2


def test_images_arrive_as_png_bytes_pil_images_or_arrays_alike():
    image = scene()
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    for form in (png.getvalue(), Image.fromarray(image), image, image / 255.0):
        assert quality.psnr_db(form, image) == calibration.PSNR_IDENTICAL_DB


def test_images_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="differ in size"):
        quality.compare(scene(96), scene(64))


def test_a_probe_set_passes_only_when_every_probe_and_both_means_reach_their_thresholds():
    rule = calibration.Thresholds(psnr_db=20, ssim=0.6, probe_psnr_db=16, probe_ssim=0.4)
    good = [{"id": "a", "psnr_db": 30.0, "ssim": 0.9}, {"id": "b", "psnr_db": 24.0, "ssim": 0.8}]
    assert calibration.judge(good, rule)["passed"]
    one_bad = good + [{"id": "c", "psnr_db": 15.0, "ssim": 0.9}]
    verdict = calibration.judge(one_bad, rule)
    assert not verdict["passed"] and [p["passed"] for p in verdict["probes"]] == [True, True, False]
    assert verdict["psnr_db_min"] == 15.0
    low_mean = [{"id": "a", "psnr_db": 18.0, "ssim": 0.9}, {"id": "b", "psnr_db": 19.0, "ssim": 0.9}]
    assert not calibration.judge(low_mean, rule)["passed"]   # each above its floor, the mean below 20
    not_finite = [{"id": "a", "psnr_db": float("nan"), "ssim": 0.9}]
    verdict = calibration.judge(not_finite, rule)
    assert not verdict["passed"] and verdict["probes"][0]["psnr_db"] is None


def test_the_probe_set_is_versioned_and_covers_what_the_gate_promises():
    probes = calibration.load_probes()
    covered = " ".join(p.covers for p in probes.probes)
    assert probes.version >= 1 and len(probes.probes) == 8
    for topic in ("text", "face", "texture", "dark", "Chinese"):
        assert topic in covered
    assert calibration.load_probes(2, 256, 2).key != probes.key   # references are kept per set, size and steps
