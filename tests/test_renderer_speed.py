"""Cold start and speed of worker.engine.diffusion.DiffusionRenderer, on the CPU with the tiny random-weight
pipeline: the prompt-embedding cache, the warm-up call inside load(), and the compile cache folders."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from shared import profiles
from shared.schema import JobSpec
from shared.settings import Settings
from worker import config, loading, registration
from worker.engine.detect import BootInfo
from worker.engine.diffusion import WARMUP_PX, DiffusionRenderer, use_compile_cache
from worker.state import STATE

REPO = Path(__file__).resolve().parents[1]
CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
# A class-16 table whose chosen profile has a smaller one below it, for the step-down.
TABLE = {"schema": 1, "profiles": {}, "measured": {}, "runs": [
    {"profile": "fp8_both_resident_compiled", "cap_gib": 15.0, "ok": True, "s_per_image": 1.2,
     "peak_reserved_gib": 11.5, "host_rss_gib": 18.0, "max_pixels": 2048 * 2048},
    {"profile": "fp8_both_stream_compiled", "cap_gib": 11.0, "ok": True, "s_per_image": 1.5,
     "peak_reserved_gib": 7.9, "host_rss_gib": 18.2, "max_pixels": 2048 * 2048},
]}


@pytest.fixture(autouse=True)
def _cache_env():
    """load() sets the torch cache variables process-wide: each test starts without them and leaves
    them as it found them."""
    saved = {name: os.environ.pop(name, None) for name in CACHE_ENV}
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


def make_renderer(tiny_dir, tmp_path, vram_class="cpu", profile="cpu", **settings) -> DiffusionRenderer:
    choice = profiles.Choice(vram_class, profile, None, None, None, profiles.REFERENCE_PIXELS, None)
    info = BootInfo(host="test", device="cpu", gpu="cpu", vram_gib=0.0, vram_class=vram_class, cap_gib=None,
                    compute_capability="", host_ram_gib=32.0, choice=choice)
    settings = {"compile_cache_dir": str(tmp_path / "compile"), **settings}
    return DiffusionRenderer(Settings.from_env({}, model=str(tiny_dir), **settings), info, table=TABLE)


def loaded(tiny_dir, tmp_path, **settings) -> DiffusionRenderer:
    r = make_renderer(tiny_dir, tmp_path, **settings)
    r.load()
    return r


def count_text_encoder_calls(renderer) -> list:
    calls = []
    renderer.pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    return calls


def job(prompt="a red cat on a stone bridge at night", **fields) -> JobSpec:
    return JobSpec(**{"prompt": prompt, "width": 256, "height": 256, "steps": 2, "seed": 7, **fields})


def pixels(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


# Prompt-embedding cache
def test_a_repeated_prompt_skips_the_text_encoder_and_gives_the_pixels_of_an_uncached_render(tiny_dir, tmp_path):
    cached = loaded(tiny_dir, tmp_path)
    uncached = loaded(tiny_dir, tmp_path, prompt_cache_size=0)
    calls = count_text_encoder_calls(cached)

    miss, hit = cached.render(job(seed=5)), cached.render(job(seed=5))

    assert (miss.facts["prompt_cache_hit"], hit.facts["prompt_cache_hit"]) == (False, True)
    assert len(calls) == 1  # the miss encoded; the hit did not
    reference = pixels(uncached.render(job(seed=5)).png)
    assert pixels(miss.png) == reference and pixels(hit.png) == reference
    assert cached.describe()["prompt_cache"] == {"size": 256, "entries": 1, "hits": 1, "misses": 1}


def test_with_guidance_the_negative_prompt_is_cached_too_and_the_pixels_do_not_change(tiny_dir, tmp_path):
    cached = loaded(tiny_dir, tmp_path)
    uncached = loaded(tiny_dir, tmp_path, prompt_cache_size=0)
    calls = count_text_encoder_calls(cached)
    guided = job(guidance=4.0, negative_prompt="fog", seed=9)

    miss, hit = cached.render(guided), cached.render(guided)
    assert len(calls) == 2  # prompt and negative prompt, once each
    other = cached.render(job("a blue dog", guidance=4.0, negative_prompt="fog"))

    assert (miss.facts["prompt_cache_hit"], hit.facts["prompt_cache_hit"]) == (False, True)
    # The negative prompt came from the cache, the new prompt did not: the text encoder still ran.
    assert other.facts["prompt_cache_hit"] is False and len(calls) == 3
    reference = pixels(uncached.render(guided).png)
    assert pixels(miss.png) == reference and pixels(hit.png) == reference


def test_a_cache_size_of_0_runs_the_text_encoder_for_every_render(tiny_dir, tmp_path):
    r = loaded(tiny_dir, tmp_path, prompt_cache_size=0)
    calls = count_text_encoder_calls(r)

    facts = [r.render(job()).facts for _ in range(2)]

    assert len(calls) == 2
    assert [f["prompt_cache_hit"] for f in facts] == [False, False]
    assert r.describe()["prompt_cache"] == {"size": 0, "entries": 0, "hits": 0, "misses": 0}


def test_a_full_cache_drops_the_least_recently_used_prompt(tiny_dir, tmp_path):
    r = loaded(tiny_dir, tmp_path, prompt_cache_size=2)

    def hit(prompt):
        return r.render(job(prompt, steps=1)).facts["prompt_cache_hit"]

    assert [hit("a cat"), hit("a dog"), hit("a cat")] == [False, False, True]
    assert hit("a tree") is False  # evicts "a dog", used less recently than "a cat"
    assert [hit("a cat"), hit("a dog")] == [True, False]
    assert r.describe()["prompt_cache"]["entries"] == 2


def test_stepping_down_to_another_profile_drops_the_cached_embeddings(tiny_dir, tmp_path, monkeypatch):
    from diffusers import ZImagePipeline

    r = loaded(tiny_dir, tmp_path, vram_class=16, profile="fp8_both_resident_compiled")
    assert r.render(job()).facts["prompt_cache_hit"] is False
    real_call, errors = ZImagePipeline.__call__, [torch.OutOfMemoryError("CUDA out of memory (test)")]

    def call(self, *args, **kwargs):
        if errors:
            raise errors.pop()
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(ZImagePipeline, "__call__", call)
    retried = r.render(job())

    assert retried.facts["downgraded_from"] == "fp8_both_resident_compiled"
    # The first attempt found the prompt cached; the retry on the new pipeline had to encode it again.
    assert retried.facts["prompt_cache_hit"] is False
    assert r.describe()["prompt_cache"] == {"size": 256, "entries": 1, "hits": 1, "misses": 2}


# Warm-up
@pytest.fixture
def pipeline_calls(monkeypatch):
    """Every ZImagePipeline call's keyword arguments; the calls still render."""
    from diffusers import ZImagePipeline

    real_call, calls = ZImagePipeline.__call__, []

    def call(self, *args, **kwargs):
        calls.append(kwargs)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(ZImagePipeline, "__call__", call)
    return calls


def test_load_ends_with_one_small_1_step_warm_up_call_timed_apart_from_loading(tiny_dir, tmp_path, pipeline_calls):
    r = loaded(tiny_dir, tmp_path)

    assert len(pipeline_calls) == 1
    warmup = pipeline_calls[0]
    assert (warmup["width"], warmup["height"]) == (WARMUP_PX["cpu"], WARMUP_PX["cpu"]) == (256, 256)
    assert warmup["num_inference_steps"] == 1 and warmup["guidance_scale"] == 0
    described = r.describe()
    assert isinstance(described["warmup_s"], float) and described["warmup_s"] >= 0
    assert isinstance(described["load_s"], float)
    # The warm-up went around the prompt cache: jobs find it empty.
    assert described["prompt_cache"]["entries"] == 0
    # Where the load went, stage by stage (on the CPU there is no CUDA context to make).
    stages = described["load_stages_s"]
    assert list(stages) == ["imports", "cuda_init", "read", "place", "warmup"]
    assert all(isinstance(v, float) and v >= 0 for v in stages.values())
    assert stages["warmup"] == described["warmup_s"] and stages["cuda_init"] == 0.0


def test_with_warm_up_turned_off_load_makes_no_pipeline_call(tiny_dir, tmp_path, pipeline_calls):
    r = loaded(tiny_dir, tmp_path, warmup=False)

    assert pipeline_calls == [] and r.describe()["warmup_s"] is None


def test_a_failing_warm_up_fails_the_load(tiny_dir, tmp_path, monkeypatch):
    from diffusers import ZImagePipeline

    def broken(self, *args, **kwargs):
        raise RuntimeError("the DiT failed to compile (test)")

    monkeypatch.setattr(ZImagePipeline, "__call__", broken)
    with pytest.raises(RuntimeError, match="failed to compile"):
        make_renderer(tiny_dir, tmp_path).load()


def test_the_worker_reports_ready_only_after_load_and_warm_up_returned(monkeypatch):
    """worker.loading flips the state the readiness gate reads (loading, then ready) only once
    renderer.load() has returned; until then the registry entry says `loading`."""
    seen = {}

    class Renderer:
        def load(self, judge=None, known_failure=None):
            seen["state during load"] = loading.LOAD_STATE.value
            seen["registry state during load"] = registration.registration(config.settings())["state"]

        def describe(self):
            return {}

    info = BootInfo(host="test", device="cpu", gpu="cpu", vram_gib=0.0, vram_class="cpu", cap_gib=None,
                    compute_capability="", host_ram_gib=32.0,
                    choice=profiles.Choice("cpu", "cpu", None, None, None, profiles.REFERENCE_PIXELS, None))
    monkeypatch.setattr(loading, "make_renderer", lambda *_: Renderer())
    monkeypatch.setattr(STATE, "boot", info)
    monkeypatch.setattr(STATE, "ready", False)
    state_before = loading.LOAD_STATE.value
    try:
        loading._load_renderer()
        assert seen == {"state during load": loading.LOADING, "registry state during load": "loading"}
        assert loading.LOAD_STATE.value == loading.READY
    finally:
        loading.LOAD_STATE.value = state_before
        loading._renderer = None
        loading._renderer_ready.clear()


# Compile cache
def test_a_fresh_worker_process_puts_the_inductor_and_triton_caches_in_the_configured_folder(tiny_dir, tmp_path):
    """In a fresh process, as in a worker's pool child: torch is first imported inside load(), after
    the cache variables are set (importing diffusers would write torch's own default into them)."""
    code = ("import json, os, sys\n"
            "from shared import profiles\n"
            "from shared.settings import Settings\n"
            "from worker import app\n"
            "from worker.engine.detect import BootInfo\n"
            "from worker.engine.diffusion import DiffusionRenderer\n"
            "torch_before_load = 'torch' in sys.modules\n"
            "choice = profiles.Choice('cpu', 'cpu', None, None, None, profiles.REFERENCE_PIXELS, None)\n"
            "info = BootInfo(host='t', device='cpu', gpu='cpu', vram_gib=0.0, vram_class='cpu', cap_gib=None,\n"
            "                compute_capability='', host_ram_gib=32.0, choice=choice)\n"
            "r = DiffusionRenderer(Settings.from_env(model=sys.argv[1]), info)\n"
            "r.load()\n"
            "print(json.dumps({'torch_before_load': torch_before_load, 'described': r.describe()['compile_cache_dir'],\n"
            "                  **{name: os.environ.get(name) for name in sys.argv[2:]}}))\n")
    env = {k: v for k, v in os.environ.items() if k not in CACHE_ENV}
    env.update(ZFARM_COMPILE_CACHE_DIR=str(tmp_path / "compile"), ZFARM_WARMUP="0")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_dir), *CACHE_ENV], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True)

    folder = tmp_path / "compile"
    assert json.loads(out.stdout.splitlines()[-1]) == {
        "torch_before_load": False, "described": str(folder / "inductor"),
        "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "TRITON_CACHE_DIR": str(folder / "triton")}
    assert (folder / "inductor").is_dir() and (folder / "triton").is_dir()


def test_an_operators_own_torchinductor_cache_dir_wins(tmp_path):
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "mine")

    assert use_compile_cache(str(tmp_path / "zfarm")) == str(tmp_path / "mine")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "zfarm" / "triton")


def test_the_compile_cache_folder_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))

    assert use_compile_cache("~/.cache/zfarm/compile") == str(tmp_path / ".cache/zfarm/compile/inductor")


def test_an_empty_compile_cache_folder_leaves_torchs_defaults(tmp_path):
    assert use_compile_cache("") is None
    assert not any(name in os.environ for name in CACHE_ENV)



def test_after_the_warm_up_the_compiled_dit_blocks_never_recompile_for_other_prompt_lengths_or_sizes(
        tiny_dir, tmp_path):
    """Within one call a block sees the image, the caption and the joint sequence, three lengths: dynamo
    compiles it for any length there, so jobs of other prompts and sizes never wait on a compile."""
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    r = loaded(tiny_dir, tmp_path, warmup=False)
    r.pipe.transformer.compile_repeated_blocks(fullgraph=True)  # as apply_profile does for `compile`
    block_code = ZImageTransformerBlock.forward.__code__
    torch._dynamo.reset()
    try:
        r._warm_up()
        graphs = len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(block_code))
        assert graphs >= 1
        for prompt, width, height in (("a cat", 256, 256), ("a red house on the river " * 12, 256, 256),
                                      ("a dog", 384, 256), ("", 512, 512)):
            r.render(JobSpec(prompt=prompt, seed=1, width=width, height=height, steps=1))
        assert len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(block_code)) == graphs
    finally:
        torch._dynamo.reset()


def test_the_warm_up_says_what_compiling_it_did_and_an_uncompiled_one_says_nothing(tiny_dir, tmp_path):
    assert loaded(tiny_dir, tmp_path / "plain").describe()["warmup_compile"] == {}
    r = loaded(tiny_dir, tmp_path, warmup=False)
    r.pipe.transformer.compile_repeated_blocks(fullgraph=True)
    torch._dynamo.reset()
    try:
        r._warm_up()
    finally:
        torch._dynamo.reset()
    summary = r.describe()["warmup_compile"]
    assert summary["graphs"] >= 1
    assert summary["fx_cache_hits"] + summary["fx_cache_misses"] >= 1
    assert 0 <= summary["tracing_s"] <= summary["dynamo_s"] and 0 <= summary["backend_s"] <= summary["dynamo_s"]
