"""worker.engine.diffusion.DiffusionRenderer on the CPU with the tiny random-weight pipeline: PNG size and
parameters, seeds, facts, and the out-of-memory step-down raised at the pipeline call boundary."""
from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from shared import profiles
from shared.errors import OutOfMemory
from shared.schema import JobSpec
from shared.settings import Settings
from worker.engine.detect import BootInfo
from worker.engine.diffusion import DiffusionRenderer

# A class-16 table: the fast profile needs more VRAM than the slower one below it.
TABLE = {"schema": 1, "profiles": {}, "measured": {}, "runs": [
    {"profile": "fp8_both_resident_compiled", "cap_gib": 15.0, "ok": True, "s_per_image": 1.2,
     "peak_reserved_gib": 11.5, "host_rss_gib": 18.0, "max_pixels": 2048 * 2048},
    {"profile": "te_fp8_stream_compiled", "cap_gib": 15.0, "ok": True, "s_per_image": 1.5,
     "peak_reserved_gib": 13.4, "host_rss_gib": 17.0, "max_pixels": 2048 * 2048},
    {"profile": "fp8_both_stream_compiled", "cap_gib": 11.0, "ok": True, "s_per_image": 1.5,
     "peak_reserved_gib": 7.9, "host_rss_gib": 18.2, "max_pixels": 2048 * 2048},
]}


def make_renderer(tiny_dir, vram_class="cpu", profile="cpu", table=None) -> DiffusionRenderer:
    choice = profiles.Choice(vram_class, profile, None, None, None, profiles.REFERENCE_PIXELS, None)
    boot = BootInfo(host="test", device="cpu", gpu="cpu", vram_gib=0.0, vram_class=vram_class, cap_gib=None,
                    compute_capability="", host_ram_gib=32.0, choice=choice)
    return DiffusionRenderer(Settings.from_env({}, model=str(tiny_dir)), boot, table=table or TABLE)


@pytest.fixture(scope="module")
def renderer(tiny_dir):
    r = make_renderer(tiny_dir)
    r.load()
    return r


@pytest.fixture
def patched_call(monkeypatch):
    """Replace ZImagePipeline.__call__ (what `pipe(...)` runs) by one that raises the given errors in
    turn, then renders for real. Returns the list of calls made."""
    from diffusers import ZImagePipeline

    real_call = ZImagePipeline.__call__
    calls = []

    def install(*errors):
        queue = list(errors)

        def call(self, *args, **kwargs):
            calls.append(kwargs.get("width"))
            if queue:
                raise queue.pop(0)
            return real_call(self, *args, **kwargs)

        monkeypatch.setattr(ZImagePipeline, "__call__", call)
        return calls

    return install


def oom():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")


def pixels(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


def job(**fields) -> JobSpec:
    return JobSpec(**{"prompt": "a red cat on a stone bridge at night", "width": 320, "height": 256, "steps": 8,
                      "seed": 7, **fields})


def test_a_render_is_a_png_of_the_requested_size_with_the_parameters_chunk(renderer):
    result = renderer.render(job(negative_prompt="fog"))

    image = Image.open(io.BytesIO(result.png))
    assert image.format == "PNG" and image.size == (320, 256)
    parameters = image.text["parameters"]
    assert parameters.startswith("a red cat on a stone bridge at night\nNegative prompt: fog\n")
    assert "Steps: 8, CFG scale: 0, Seed: 7, Size: 320x256" in parameters
    stored = json.loads(image.text["zfarm"])
    assert stored["seed"] == 7 and stored["profile"] == "cpu" and stored["dtype"] == "float32"
    assert result.render_s > 0


def test_the_same_seed_gives_identical_pixels_and_another_seed_does_not(renderer):
    first, again, other = (renderer.render(job(seed=s)).png for s in (11, 11, 12))
    assert pixels(first) == pixels(again)
    assert pixels(first) != pixels(other)


def test_a_freshly_loaded_renderer_gives_the_same_pixels_for_the_same_job(renderer, tiny_dir):
    fresh = make_renderer(tiny_dir)
    fresh.load()
    assert pixels(fresh.render(job(seed=21)).png) == pixels(renderer.render(job(seed=21)).png)


def test_facts_name_the_profile_gpu_model_peak_vram_and_versions(renderer, tiny_dir):
    facts = renderer.render(job(steps=2)).facts

    assert facts["profile"] == "cpu" and facts["gpu"] == "cpu" and facts["model"] == str(tiny_dir)
    assert facts["peak_vram_gib"] is None  # no GPU memory on a CPU
    assert set(facts["versions"]) >= {"torch", "diffusers", "transformers"}
    assert "downgraded_from" not in facts
    assert renderer.describe()["profile"] == "cpu" and renderer.describe()["dtype"] == "float32"


def test_an_out_of_memory_error_at_the_pipeline_call_steps_down_once_and_retries_the_job(tiny_dir, patched_call):
    r = make_renderer(tiny_dir, vram_class=16, profile="fp8_both_resident_compiled")
    r.load()
    calls = patched_call(oom())

    result = r.render(job(seed=3))

    assert len(calls) == 2  # the failed call and one retry
    assert result.facts["downgraded_from"] == "fp8_both_resident_compiled"
    # te_fp8_stream_compiled is next by speed but needs more VRAM: the step goes below the failed peak.
    assert result.facts["profile"] == "fp8_both_stream_compiled"
    assert [(d["from"], d["to"]) for d in r.downgrades] == [("fp8_both_resident_compiled", "fp8_both_stream_compiled")]
    assert r.profile == "fp8_both_stream_compiled" and r.describe()["downgrades"] == r.downgrades
    assert json.loads(Image.open(io.BytesIO(result.png)).text["zfarm"])["downgraded_from"] == \
        "fp8_both_resident_compiled"


def test_a_second_out_of_memory_error_raises_out_of_memory_without_looping(tiny_dir, patched_call):
    r = make_renderer(tiny_dir, vram_class=16, profile="fp8_both_resident_compiled")
    r.load()
    calls = patched_call(oom(), oom(), oom())

    with pytest.raises(OutOfMemory, match="out of memory again after stepping down from "
                                          "fp8_both_resident_compiled to fp8_both_stream_compiled"):
        r.render(job(seed=4))
    assert len(calls) == 2
    assert len(r.downgrades) == 1


def test_out_of_memory_on_the_smallest_profile_raises_at_once_and_the_renderer_stays_usable(tiny_dir,
                                                                                              patched_call):
    r = make_renderer(tiny_dir, vram_class=16, profile="fp8_both_stream_compiled")
    r.load()
    calls = patched_call(oom())

    with pytest.raises(OutOfMemory, match="no measured profile needs less VRAM for class 16g"):
        r.render(job(seed=5))
    assert len(calls) == 1 and r.downgrades == []
    assert Image.open(io.BytesIO(r.render(job(seed=5)).png)).size == (320, 256)


def test_an_error_other_than_out_of_memory_is_not_retried(tiny_dir, patched_call):
    r = make_renderer(tiny_dir, vram_class=16, profile="fp8_both_resident_compiled")
    r.load()
    calls = patched_call(ValueError("bad latents"))

    with pytest.raises(ValueError, match="bad latents"):
        r.render(job(seed=6))
    assert len(calls) == 1 and r.downgrades == []
