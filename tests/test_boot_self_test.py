"""The boot self-test and its step-down: a profile whose warm-up fails to compile, runs out of memory,
hits an unsupported op or renders NaN or constant pixels is dropped for the next one the chooser lists;
the worker says from which and why in its registry entry, `zfarm workers`, Flower's stats, the metrics
and each sidecar; when every profile fails it stops with exit 78, naming each one and its error.

The tiny random-weight pipeline renders on the CPU (every profile applies as "cpu" there), so the
failures are injected at the pipeline call, keyed on the profile being loaded."""
from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from farm import wait_for
from shared import keys, profiles, registry
from shared.errors import BadOutput, NoWorkingProfile
from shared.schema import JobSpec
from shared.settings import Settings
from worker.engine.detect import BootInfo
from worker.engine.diffusion import DiffusionRenderer, check_pixels, failure_kind


def choice(name: str, max_pixels: int = profiles.REFERENCE_PIXELS) -> profiles.Choice:
    return profiles.Choice(16, name, 1.0, 10.0, 12.0, max_pixels, 15.0)


def renderer_with(tiny_dir, chosen: str, *fallbacks: str) -> DiffusionRenderer:
    boot = BootInfo(host="test", device="cpu", gpu="cpu", vram_gib=16.0, vram_class=16, cap_gib=None,
                    compute_capability="", host_ram_gib=32.0, choice=choice(chosen),
                    fallbacks=tuple(choice(f) for f in fallbacks))
    return DiffusionRenderer(Settings.from_env({}, model=str(tiny_dir)), boot, table={"runs": []})


@pytest.fixture
def failing(monkeypatch):
    """`failing({"a": error, "b": "nan"})`: the pipeline call raises `error` (or renders NaN, or a
    constant image) while profile a (b) is being loaded; any other profile renders for real."""
    from diffusers import ZImagePipeline

    real_call = ZImagePipeline.__call__
    current = {}

    def install(plan: dict):
        real_load = DiffusionRenderer._load_profile

        def load(self, name, *policy):
            current["renderer"] = self
            return real_load(self, name, *policy)

        def call(pipe, *args, **kwargs):
            what = plan.get(current["renderer"].loading_profile)
            out = real_call(pipe, *args, **kwargs) if not isinstance(what, BaseException) else None
            if isinstance(what, BaseException):
                raise what
            if what == "nan":
                out.images = out.images * float("nan")
            elif what == "black":
                out.images = torch.zeros_like(out.images)
            return out

        monkeypatch.setattr(DiffusionRenderer, "_load_profile", load)
        monkeypatch.setattr(ZImagePipeline, "__call__", call)
    return install


def compile_error(text: str = "type fp8e4nv not supported in this architecture") -> Exception:
    """The exception torch.compile raises when its backend fails, made by a real (failing) compile."""
    def backend(graph, example_inputs):
        raise RuntimeError(text)

    torch._dynamo.reset()
    try:
        torch.compile(lambda x: x * 2 + 1, backend=backend)(torch.ones(3))
    except Exception as exc:  # the failure is what this helper is for
        return exc
    raise AssertionError("the failing backend compiled")


# The pixel check
def test_noise_passes_the_pixel_check_and_nan_or_black_fail_it():
    assert check_pixels(torch.rand(1, 3, 32, 32))["finite"] is True
    with pytest.raises(BadOutput, match="NaN or infinite"):
        check_pixels(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(BadOutput, match="constant"):
        check_pixels(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("error, kind", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out-of-memory"),
    (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"), "out-of-memory"),
    (BadOutput("the image is constant"), "bad-output"),
    (RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul"), "unsupported"),
    (NotImplementedError("_scaled_mm is not implemented for sm_86"), "unsupported"),
    (ValueError("something else entirely"), "error"),
])
def test_a_boot_failure_is_classified_by_what_went_wrong(error, kind):
    assert failure_kind(error) == kind


def test_a_dynamo_backend_failure_counts_as_a_compile_error():
    assert failure_kind(compile_error("PassManager::run failed")) == "compile"
    # Triton's refusal of a type on an older card names the card's limit: unsupported.
    assert failure_kind(compile_error()) == "unsupported"


# Step-down in the renderer
def test_the_renderer_steps_down_past_a_compile_error_and_nan_pixels_to_the_first_profile_that_works(
        tiny_dir, failing):
    failing({"fast": compile_error(), "middle": "nan"})
    renderer = renderer_with(tiny_dir, "fast", "middle", "safe")
    renderer.load()

    assert renderer.profile == "safe"
    assert [(a["profile"], a["kind"]) for a in renderer.boot_attempts] == [
        ("fast", "unsupported"), ("middle", "bad-output"), ("safe", "ok")]
    assert renderer.boot_step_down["from"] == "fast" and renderer.boot_step_down["to"] == "safe"
    assert "not supported in this architecture" in renderer.boot_step_down["reason"]
    assert renderer.self_test["finite"] is True and renderer.self_test["std"] > 0

    result = renderer.render(JobSpec(prompt="a fox", width=256, height=256, steps=1, seed=3))
    assert result.facts["profile"] == "safe" and result.facts["downgraded_from"] == "fast"
    assert result.facts["downgrade_reason"] == renderer.boot_step_down["reason"]
    in_png = json.loads(Image.open(io.BytesIO(result.png)).text["zfarm"])
    assert in_png["downgraded_from"] == "fast"


def test_out_of_memory_and_a_black_image_at_boot_step_down_too(tiny_dir, failing):
    failing({"big": torch.OutOfMemoryError("CUDA out of memory (test)"), "black": "black"})
    renderer = renderer_with(tiny_dir, "big", "black", "small")
    renderer.load()
    assert [a["kind"] for a in renderer.boot_attempts] == ["out-of-memory", "bad-output", "ok"]
    assert renderer.profile == "small"


def test_a_profile_that_passes_first_time_leaves_no_step_down(tiny_dir, failing):
    failing({})
    renderer = renderer_with(tiny_dir, "fine", "other")
    renderer.load()
    assert renderer.profile == "fine" and renderer.boot_step_down == {}
    result = renderer.render(JobSpec(prompt="a fox", width=256, height=256, steps=1, seed=3))
    assert "downgraded_from" not in result.facts


def test_when_every_profile_fails_the_error_names_each_one_and_why(tiny_dir, failing):
    failing({"a": compile_error(), "b": "nan", "c": torch.OutOfMemoryError("CUDA out of memory (test)")})
    renderer = renderer_with(tiny_dir, "a", "b", "c")
    with pytest.raises(NoWorkingProfile) as caught:
        renderer.load()
    message = str(caught.value)
    assert [a["profile"] for a in caught.value.attempts] == ["a", "b", "c"]
    assert "  - b: bad-output: BadOutput:" in message and "  - c: out-of-memory:" in message


# The parent's side: registry, `zfarm workers`, stats, metrics
def test_the_parent_adopts_the_profile_that_passed_and_every_view_says_why(redis_client, monkeypatch):
    from producer.api import Farm
    from worker import config, inspect_info, metrics, registration
    from worker.state import WorkerState

    monkeypatch.setattr(registration, "STATE", WorkerState())
    monkeypatch.setattr(inspect_info, "STATE", registration.STATE)
    state = registration.STATE
    big, small = choice("fast", 2048 * 2048), choice("safe", 1024 * 1024)
    state.boot = BootInfo(host="h", device="cuda", gpu="RTX", vram_gib=16.0, vram_class=16, cap_gib=None,
                          compute_capability="8.6", host_ram_gib=32.0, choice=big, arch="sm_86", fallbacks=(small,))
    state.name, state.instance = "w@h", "i1"
    table = {"runs": [{"profile": "fast", "cap_gib": 15.0, "ok": True, "s_per_image": 1.0, "peak_reserved_gib": 9.0,
                       "max_pixels": 2048 * 2048},
                      {"profile": "low", "cap_gib": 7.0, "ok": True, "s_per_image": 2.0, "peak_reserved_gib": 5.0,
                       "max_pixels": 1024 * 1024}]}
    monkeypatch.setattr(config, "_table", table)
    monkeypatch.setattr(config, "_settings", Settings.from_env({}))
    before = {q for q in state.queues}
    report = {"profile": "safe", "self_test": {"finite": True}, "downgraded_from": "fast",
              "reason": "compile: BackendCompilerFailed: type fp8e4nv not supported in this architecture",
              "attempts": [{"profile": "fast", "kind": "compile", "error": "..."}, {"profile": "safe", "kind": "ok",
                                                                                    "error": ""}]}
    registration._adopt_step_down(report)
    state.ready = True
    registry.register(redis_client, registration.registration(config.settings()), 30)

    assert state.boot.choice.profile == "safe" and state.queues and set(state.queues) != before
    assert all(".c" not in q for q in state.queues)  # only the shared tier: 1024x1024 jobs at most
    entry = registry.live_workers(redis_client)[0]
    assert (entry["profile"], entry["downgraded_from"], entry["max_pixels"]) == ("safe", "fast", 1024 * 1024)
    assert entry["downgrade_reason"].startswith("compile:") and entry["boot_attempts"][0]["profile"] == "fast"
    row = Farm(Settings.from_env({}), redis_client=redis_client, table=table).workers()[0]
    assert (row["downgraded_from"], row["arch"]) == ("fast", "sm_86")
    info = inspect_info.InfoStep.info(None, None)["zfarm"]
    assert info["downgraded_from"] == "fast" and info["profile"] == "safe"
    sample = metrics._families().profile_stepdowns.labels("16g", "fast", "safe", "compile")
    assert sample._value.get() >= 1


# A real worker whose every profile fails
def test_a_worker_whose_images_are_all_nan_stops_with_exit_78_naming_the_profile_and_never_serves(
        tiny_dir, tmp_path, start_worker, redis_server, redis_client):
    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_dir, broken)
    weights_file = broken / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    bias = next(k for k in weights if k.endswith("conv_out.bias") and k.startswith("decoder"))
    weights[bias] = torch.full_like(weights[bias], float("nan"))
    save_file(weights, weights_file)

    worker = start_worker(f"file://{tmp_path / 'out'}", ("--model", str(broken), "--name", "nan-card"),
                          wait_ready=False, ZFARM_MODEL=str(broken))
    wait_for(lambda: worker.proc.poll() is not None, 180, what="the worker to stop")
    assert worker.proc.returncode == 78
    log = worker.output()
    assert "no profile this worker may run passed its boot self-test" in log
    assert "- cpu: bad-output: BadOutput:" in log and "NaN or infinite" in log
    [entry] = [w for w in registry.live_workers(redis_client) if w["name"].startswith("nan-card@")]
    assert entry["state"] == "failed" and "- cpu: bad-output" in entry["error"]
    assert 0 < redis_client.ttl(keys.worker(entry["name"])) <= 600
