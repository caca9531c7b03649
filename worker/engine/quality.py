"""The quality gate's measurements: probe images rendered through a renderer, and how far one image is
from its reference. No weights to download: PSNR over the RGB pixels, and SSIM (Wang et al., 2004) on
luminance with an 11-tap Gaussian window of sigma 1.5, both on 8-bit images as users get them.

A perceptual metric (LPIPS) would need network weights fetched at run time, which a worker may not be
able to; docs/quality.md says what PSNR and SSIM catch and what they miss.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from shared.calibration import PSNR_IDENTICAL_DB, Probe, ProbeSet
from shared.schema import JobSpec

SSIM_SIGMA = 1.5
SSIM_TAPS = 11
SSIM_K1, SSIM_K2 = 0.01, 0.03
PIXEL_MAX = 255.0
# ITU-R BT.601 luma weights.
LUMA = np.array([0.299, 0.587, 0.114])


def as_rgb8(image) -> np.ndarray:
    """An HxWx3 uint8 array from a PIL image, PNG bytes or an array (uint8, or float in 0..1)."""
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(np.nan_to_num(array.astype(np.float64), nan=0.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return array


def psnr_db(image, reference) -> float:
    """Peak signal-to-noise ratio of two same-size 8-bit RGB images, in dB; identical images give
    PSNR_IDENTICAL_DB (JSON has no infinity)."""
    a, b = as_rgb8(image).astype(np.float64), as_rgb8(reference).astype(np.float64)
    _same_shape(a, b)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return PSNR_IDENTICAL_DB
    return min(PSNR_IDENTICAL_DB, 10 * math.log10(PIXEL_MAX ** 2 / mse))


def _gaussian_taps() -> np.ndarray:
    x = np.arange(SSIM_TAPS) - (SSIM_TAPS - 1) / 2
    taps = np.exp(-(x ** 2) / (2 * SSIM_SIGMA ** 2))
    return taps / taps.sum()


def _filter(image: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable correlation with `taps` over rows then columns, keeping only fully covered pixels."""
    n = len(taps)
    rows = sum(taps[i] * image[i:image.shape[0] - n + 1 + i, :] for i in range(n))
    return sum(taps[i] * rows[:, i:rows.shape[1] - n + 1 + i] for i in range(n))


def luminance(image) -> np.ndarray:
    return as_rgb8(image).astype(np.float64) @ LUMA


def ssim(image, reference) -> float:
    """Mean structural similarity of the two images' luminance (1.0: identical)."""
    a, b = luminance(image), luminance(reference)
    _same_shape(a, b)
    if min(a.shape) < SSIM_TAPS:
        raise ValueError(f"images of {a.shape[1]}x{a.shape[0]} are smaller than the SSIM window ({SSIM_TAPS})")
    taps = _gaussian_taps()
    c1, c2 = (SSIM_K1 * PIXEL_MAX) ** 2, (SSIM_K2 * PIXEL_MAX) ** 2
    mu_a, mu_b = _filter(a, taps), _filter(b, taps)
    var_a = _filter(a * a, taps) - mu_a ** 2
    var_b = _filter(b * b, taps) - mu_b ** 2
    cov = _filter(a * b, taps) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape} and {b.shape}")


def compare(image, reference) -> dict:
    """{psnr_db, ssim} of `image` against `reference`."""
    return {"psnr_db": psnr_db(image, reference), "ssim": ssim(image, reference)}


def probe_job(probe: Probe, probe_set: ProbeSet) -> JobSpec:
    """The job a probe is rendered as: its prompt and seed, the set's size and steps, no guidance."""
    return JobSpec(prompt=probe.prompt, width=probe_set.size_px, height=probe_set.size_px,
                   steps=probe_set.steps, guidance=0.0, seed=probe.seed)


def render_probes(renderer, probe_set: ProbeSet) -> dict[str, bytes]:
    """{probe id: PNG} of each probe rendered by `renderer` (a loaded `DiffusionRenderer`), as jobs are."""
    out = {}
    for probe in probe_set.probes:
        image = renderer.render_image(probe_job(probe, probe_set))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out[probe.id] = buffer.getvalue()
    return out
