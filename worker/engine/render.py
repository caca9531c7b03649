"""What every renderer returns (a PNG with its parameters, and the facts of the render), and the
simulated renderer for load tests. The diffusers renderer is `worker.engine.diffusion`; which one a
worker runs is decided by `worker.loading.make_renderer`. No torch here.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from shared.calibration import NOT_APPLICABLE, quality_block
from shared.routing import work_units
from shared.schema import JobSpec


@dataclass
class RenderResult:
    png: bytes
    render_s: float
    # What made the image, for the sidecar: profile, gpu, peak_vram_gib, downgraded_from, simulated...
    facts: dict = field(default_factory=dict)


def encode_png(image: Image.Image, spec: JobSpec, extra: dict) -> bytes:
    """PNG with the generation parameters in text chunks, as other image tools write them."""
    info = PngInfo()
    info.add_text("parameters", (
        f"{spec.prompt}\nNegative prompt: {spec.negative_prompt}\n"
        f"Steps: {spec.steps}, CFG scale: {spec.guidance:g}, Seed: {spec.seed}, "
        f"Size: {spec.width}x{spec.height}, Model: {extra.get('model', '')}"))
    info.add_text("zfarm", json.dumps({**spec.to_dict(), **extra}, default=str))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


# The quality gate does not concern a renderer that draws no model's images.
SIMULATED_QUALITY = quality_block(NOT_APPLICABLE, reason="simulated renderer: no model renders")


class SimulatedRenderer:
    """Sleeps `s_per_image` per 1024x1024 8-step image (scaled by pixels and steps) and draws a small
    deterministic picture. Never the default: every result it writes says `simulated`."""

    def __init__(self, s_per_image: float, model: str = "simulated"):
        self.s_per_image = s_per_image
        self.model = model
        self.profile = "simulated"

    def load(self) -> None:
        pass

    def describe(self) -> dict:
        return {"renderer": "simulated", "profile": self.profile, "simulate_s": self.s_per_image,
                "quality": dict(SIMULATED_QUALITY)}

    def render(self, spec: JobSpec) -> RenderResult:
        t0 = time.monotonic()
        time.sleep(self.s_per_image * work_units(spec.pixels, spec.steps))
        digest = hashlib.sha256(f"{spec.prompt}|{spec.seed}|{spec.width}x{spec.height}".encode()).digest()
        # A small image keeps load tests cheap; its aspect matches the job's.
        scale = max(spec.width, spec.height) / 64
        size = (max(1, round(spec.width / scale)), max(1, round(spec.height / scale)))
        image = Image.new("RGB", size, tuple(digest[:3]))
        facts = {"simulated": True, "profile": self.profile, "model": self.model,
                 "image_size": list(size), "quality": dict(SIMULATED_QUALITY)}
        png = encode_png(image, spec, facts)
        return RenderResult(png=png, render_s=time.monotonic() - t0, facts=facts)
