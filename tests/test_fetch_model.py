"""`zfarm fetch-model`: bf16 conversion of a float32 transformer, and clear errors when offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from worker.engine import fetch

REPO = Path(__file__).resolve().parents[1]
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def shard_tensors() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [
        {"blocks.0.weight": torch.randn(64, 32, generator=gen), "blocks.0.bias": torch.randn(64, generator=gen)},
        {"blocks.1.weight": torch.randn(32, 64, generator=gen), "pos_ids": torch.arange(16, dtype=torch.int64)},
    ]


@pytest.fixture
def pipeline_dir(tmp_path) -> Path:
    """A small pipeline folder shaped like Z-Image-Turbo's: float32 transformer in two shards."""
    root = tmp_path / "z-image"
    (root / "transformer").mkdir(parents=True)
    (root / "text_encoder").mkdir()
    (root / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}')
    (root / "transformer" / "config.json").write_text('{"dim": 64}')
    weight_map, total = {}, 0
    for i, tensors in enumerate(shard_tensors(), start=1):
        name = f"diffusion_pytorch_model-{i:05d}-of-00002.safetensors"
        save_file(tensors, str(root / "transformer" / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (root / "transformer" / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                          "weight_map": weight_map}))
    save_file({"embed": torch.ones(8, 4)}, str(root / "text_encoder" / "model.safetensors"))
    return root


def read(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_bf16_conversion_writes_a_sibling_folder_with_bf16_float_tensors(pipeline_dir):
    out = fetch.to_bf16(pipeline_dir)
    assert out == pipeline_dir.with_name("z-image-bf16")
    for i, originals in enumerate(shard_tensors(), start=1):
        converted = read(out / "transformer" / f"diffusion_pytorch_model-{i:05d}-of-00002.safetensors")
        assert converted.keys() == originals.keys()
        for key, original in originals.items():
            if original.dtype == torch.float32:
                assert converted[key].dtype == torch.bfloat16
                assert torch.allclose(converted[key].float(), original, rtol=1e-2, atol=1e-2)
            else:
                assert torch.equal(converted[key], original)


def test_the_index_keeps_its_weight_map_and_records_the_new_total_size(pipeline_dir):
    out = fetch.to_bf16(pipeline_dir)
    before = json.loads((pipeline_dir / "transformer" / INDEX).read_text())
    after = json.loads((out / "transformer" / INDEX).read_text())
    assert after["weight_map"] == before["weight_map"]
    float_bytes = sum(t.numel() * 4 for s in shard_tensors() for t in s.values() if t.dtype == torch.float32)
    assert after["metadata"]["total_size"] == before["metadata"]["total_size"] - float_bytes // 2


def test_other_components_are_linked_unchanged_and_the_source_is_untouched(pipeline_dir):
    source_shard = pipeline_dir / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors"
    out = fetch.to_bf16(pipeline_dir)
    assert read(source_shard)["blocks.0.weight"].dtype == torch.float32
    assert read(out / "text_encoder" / "model.safetensors")["embed"].dtype == torch.float32
    assert (out / "text_encoder" / "model.safetensors").samefile(pipeline_dir / "text_encoder" / "model.safetensors")
    assert (out / "model_index.json").read_text() == (pipeline_dir / "model_index.json").read_text()
    assert (out / "transformer" / "config.json").read_text() == '{"dim": 64}'


def test_a_second_run_reuses_the_converted_folder(pipeline_dir):
    out = fetch.to_bf16(pipeline_dir)
    shard = out / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors"
    mtime_ns = shard.stat().st_mtime_ns
    assert fetch.to_bf16(pipeline_dir) == out
    assert shard.stat().st_mtime_ns == mtime_ns


def test_an_interrupted_conversion_is_redone_from_scratch(pipeline_dir):
    partial = pipeline_dir.with_name("z-image-bf16.partial")
    partial.mkdir()
    (partial / "junk").write_text("left by a killed run")
    out = fetch.to_bf16(pipeline_dir)
    assert not partial.exists()
    assert not (out / "junk").exists()


def test_the_cli_prints_only_the_path_to_set_as_zfarm_model(pipeline_dir, capsys):
    assert fetch.main(["--model", str(pipeline_dir), "--bf16"]) == 0
    assert capsys.readouterr().out == f"{pipeline_dir.with_name('z-image-bf16')}\n"


def test_a_converted_folder_is_not_converted_again(pipeline_dir):
    out = fetch.to_bf16(pipeline_dir)
    assert fetch.to_bf16(out) == out
    assert not out.with_name(out.name + "-bf16").exists()


def test_a_folder_without_a_transformer_is_refused_clearly(tmp_path, capsys):
    (tmp_path / "not-a-pipeline").mkdir()
    (tmp_path / "not-a-pipeline" / "model_index.json").write_text("{}")
    assert fetch.main(["--model", str(tmp_path / "not-a-pipeline"), "--bf16"]) == 2
    assert "has no transformer folder" in capsys.readouterr().err


def test_an_unreachable_model_gives_a_clear_error_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "worker.engine.fetch", "--model", "zfarm-test/no-such-model",
         "--cache-dir", str(tmp_path / "cache")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("zfarm fetch-model: error: ")
    assert "Hugging Face Hub 'zfarm-test/no-such-model' (HF_HUB_OFFLINE=1, cache only" in done.stderr
    assert "Point ZFARM_MODEL at a local folder" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_converted_zimage_transformer_loads_in_diffusers_with_the_same_weights(tmp_path):
    from diffusers import ZImageTransformer2DModel

    tiny = ZImageTransformer2DModel(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                    cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[64, 32, 32])
    tiny.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="100KB")  # many shards
    out = fetch.to_bf16(tmp_path / "pipe")
    loaded = ZImageTransformer2DModel.from_pretrained(out / "transformer", torch_dtype=torch.bfloat16)
    original = tiny.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, original[key].to(torch.bfloat16)), key
