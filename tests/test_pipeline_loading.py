"""Loading the Z-Image pipeline (worker.engine.pipeline) and the profile catalogue, on the CPU, with the tiny
random-weight pipeline of the real classes built once per session."""
from __future__ import annotations

import pytest
import torch

from shared.errors import ProfileError
from worker.engine import model_source, pipeline, placement, specs, tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-zimage")
    tiny.build_tiny(folder)
    return folder


@pytest.fixture
def offline(monkeypatch):
    """No network: the hub libraries answer from their (empty, temporary) caches only."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import; set its copy too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_local_folder_loads_as_a_zimage_pipeline_of_the_real_classes(tiny_dir):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")

    assert isinstance(pipe, ZImagePipeline)
    assert isinstance(pipe.transformer, ZImageTransformer2DModel)
    assert isinstance(pipe.text_encoder, Qwen3Model)
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae.config.latent_channels == 16
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    assert pipe.transformer.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert "<|im_start|>" in pipe.tokenizer.apply_chat_template([{"role": "user", "content": "a cat"}],
                                                                 tokenize=False, add_generation_prompt=True)


def test_components_loaded_one_by_one_onto_the_device_have_the_same_weights(tiny_dir):
    whole = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")
    parts = pipeline.load_pipeline(str(tiny_dir), torch.float32, gpu_components=pipeline.COMPONENTS, device="cpu")

    for name in pipeline.COMPONENTS:
        a, b = getattr(whole, name).state_dict(), getattr(parts, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_the_tiny_pipeline_is_the_same_every_time_it_is_built(tmp_path, tiny_dir):
    tiny.build_tiny(tmp_path)
    for part in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / part).read_bytes() == (tiny_dir / part).read_bytes(), part


def test_a_missing_hugging_face_id_raises_model_not_found_naming_each_source_and_the_fix(offline, tmp_path):
    with pytest.raises(pipeline.ModelNotFound) as caught:
        pipeline.load_pipeline("zfarm-tests/no-such-model", torch.float32, cache_dir=str(tmp_path), device="cpu")

    message = str(caught.value)
    assert "local folder 'zfarm-tests/no-such-model': no such folder" in message
    assert "Hugging Face Hub 'zfarm-tests/no-such-model' (HF_HUB_OFFLINE=1, cache only" in message
    assert "ZFARM_MODEL" in message and "local folder" in message and "model_index.json" in message
    assert len(caught.value.tried) == 2


def test_a_missing_modelscope_id_raises_model_not_found_naming_modelscope_and_the_fix(offline, tmp_path):
    with pytest.raises(pipeline.ModelNotFound) as caught:
        pipeline.load_pipeline("modelscope:zfarm-tests/no-such-model", torch.float32, cache_dir=str(tmp_path),
                               device="cpu")

    message = str(caught.value)
    assert "ModelScope 'zfarm-tests/no-such-model' (offline, cache only" in message
    assert "ZFARM_MODEL" in message and "local folder" in message


def test_a_folder_that_does_not_exist_is_reported_as_a_missing_folder(tmp_path):
    with pytest.raises(pipeline.ModelNotFound, match="no such folder"):
        pipeline.load_pipeline(str(tmp_path / "models" / "zimage"), torch.float32, device="cpu")


def test_a_folder_without_model_index_is_not_taken_for_a_pipeline(tmp_path):
    with pytest.raises(pipeline.ModelNotFound, match="no model_index.json"):
        pipeline.load_pipeline(str(tmp_path), torch.float32, device="cpu")


def test_the_loading_error_is_also_the_error_the_worker_boot_catches(tmp_path):
    with pytest.raises(model_source.ModelNotFound):
        pipeline.load_pipeline(str(tmp_path / "nothing-here"), torch.float32, device="cpu")


def test_weights_load_in_float32_on_the_cpu_and_never_in_fp16():
    assert pipeline.default_dtype("cpu") == torch.float32
    assert pipeline.default_dtype("cuda") in (torch.bfloat16, torch.float32)


def test_every_profile_has_a_one_line_description_and_a_valid_spec():
    assert {"resident", "resident_compiled", "te_stream", "te_stream_fp8", "te_fp8_resident",
            "te_fp8_resident_compiled", "fp8_both_resident", "group_stream", "group_stream_lowmem",
            "te_stream_lowmem", "model_offload", "sequential", "cpu"} <= set(specs.PROFILES)
    for name, description in specs.PROFILES.items():
        assert description and "\n" not in description, name
        assert specs.spec_for(name).description == description


def test_an_unknown_profile_is_refused_by_name():
    with pytest.raises(ProfileError, match="unknown profile 'turbo'"):
        specs.spec_for("turbo")


def test_a_gpu_profile_is_refused_on_a_cpu_and_the_cpu_profile_applies(tiny_dir):
    pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")
    with pytest.raises(ProfileError, match="needs a CUDA GPU"):
        placement.apply_profile(pipe, "te_stream", "cpu")
    assert placement.apply_profile(pipe, "cpu", "cpu").recipe == "cpu"


def test_only_components_kept_resident_in_bf16_load_straight_onto_the_gpu():
    assert specs.gpu_components("resident") == ("transformer", "text_encoder", "vae")
    assert specs.gpu_components("te_fp8_stream_compiled") == ("transformer", "vae")
    assert specs.gpu_components("group_stream_fp8") == ("vae",)
    assert specs.gpu_components("model_offload") == ()
