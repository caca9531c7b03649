"""Loading components tensor by tensor from their .safetensors files (worker.engine.streamload,
placement.load_stored), on the CPU: the same model as loading whole then converting, bit for bit; sharded
and prefixed checkpoints; what a broken checkpoint raises; and host memory that does not grow by the
whole component."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from shared.errors import CheckpointError
from worker.engine import int8, pipeline, placement, specs, streamload

ROOT = Path(__file__).resolve().parent.parent


def usual(tiny_dir, component: str, dtype):
    """The component loaded whole by diffusers/transformers, then converted as placement does."""
    pipe = pipeline.load_pipeline(str(tiny_dir), dtype, device="cpu")
    module = getattr(pipe, component)
    placement.convert_weights(module, "int8mm", "cpu", dtype, specs.spec_for("int8mm_both_fast_compiled",
                                                                             {"fuse_projections": False,
                                                                              "attention": "", "real_rope": False}))
    return module


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]
    left, right = dict([*a.named_parameters(), *a.named_buffers()]), dict([*b.named_parameters(), *b.named_buffers()])
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        assert tensor.dtype == right[name].dtype and torch.equal(tensor, right[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_a_component_read_tensor_by_tensor_is_bit_for_bit_the_one_loaded_whole_then_converted(tiny_dir, component,
                                                                                              dtype):
    streamed = placement.load_stored(str(tiny_dir), component, "int8mm", dtype, "cpu")
    assert_same_model(streamed, usual(tiny_dir, component, dtype))
    layers = [m for m in streamed.modules() if isinstance(m, int8.Int8Linear)]
    assert layers and all(m.weight.dtype == torch.int8 and m.weight_scale.dtype == torch.float32 for m in layers)
    # Only the DiT multiplies in int8; the text encoder's weights are dequantised (as convert_weights does).
    assert all(m.int8_matmul is (component == "transformer") for m in layers)
    assert not streamed.training and streamed.dtype == dtype


def test_a_pipeline_loaded_for_an_int8_profile_draws_the_image_of_one_converted_after_loading(tiny_dir):
    """In bf16, as the GPU profiles load: in float32 diffusers keeps the tiny checkpoint's tensors mapped
    from the file, where some lie off the 64-byte alignment CPU matmul kernels prefer, which changes their
    last bits (not the loader's doing)."""
    name, eager = "int8mm_both_fast_compiled", {"compile": "", "vae_compile": False}
    images = []
    for stream_loaded in (specs.stream_loaded(name, eager), None):
        pipe = pipeline.load_pipeline(str(tiny_dir), torch.bfloat16, device="cpu", stream_loaded=stream_loaded)
        placement.apply_profile(pipe, name, "cpu", eager, cpu_trial=True)
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(prompt="a red lantern", height=128, width=128, num_inference_steps=2, guidance_scale=0.0,
                           generator=torch.Generator("cpu").manual_seed(2), output_type="np").images[0])
    assert (images[0] == images[1]).all()


def test_a_sharded_checkpoint_is_read_through_its_index(tiny_dir, tmp_path):
    pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")
    folder = tmp_path / "sharded"
    pipe.save_pretrained(folder, max_shard_size="20KB")
    assert len(streamload.checkpoint_files(str(folder / "text_encoder"))) > 1
    streamed = placement.load_stored(str(folder), "text_encoder", "int8mm", torch.float32, "cpu")
    assert_same_model(streamed, usual(tiny_dir, "text_encoder", torch.float32))


def test_a_checkpoint_saved_with_its_head_loads_into_the_bare_text_encoder(tiny_dir, tmp_path):
    """Qwen3 checkpoints saved from the causal-LM class name every tensor "model.*" and carry lm_head."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "prefixed"
    (folder / "text_encoder").mkdir(parents=True)
    (folder / "text_encoder" / "config.json").write_text((tiny_dir / "text_encoder" / "config.json").read_text())
    tensors = load_file(tiny_dir / "text_encoder" / "model.safetensors")
    tensors = {f"model.{k}": v for k, v in tensors.items()} | {"lm_head.weight": torch.zeros(3, 3)}
    save_file(tensors, folder / "text_encoder" / "model.safetensors")
    streamed = placement.load_stored(str(folder), "text_encoder", "int8mm", torch.float32, "cpu")
    assert_same_model(streamed, usual(tiny_dir, "text_encoder", torch.float32))


def test_a_tensor_no_file_holds_raises_checkpoint_error_naming_it(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    del tensors["layers.1.attention.norm_q.weight"], tensors["layers.0.feed_forward.w2.weight"]
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    model = pipeline.empty_component(str(tiny_dir), "transformer", torch.float32)
    with pytest.raises(CheckpointError, match=r"2 tensor\(s\).*layers.0.feed_forward.w2.weight"):
        streamload.load_into(model, [str(tmp_path / "diffusion_pytorch_model.safetensors")], torch.float32, "cpu")


def test_a_file_that_is_not_safetensors_or_ends_early_raises_checkpoint_error(tmp_path):
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors header"):
        streamload.read_header(str(junk))
    from safetensors.torch import save_file

    save_file({"weight": torch.ones(64, 64)}, junk)
    junk.write_bytes(junk.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="ends inside tensor 'weight'"):
        streamload.load_into(torch.nn.Linear(64, 64, bias=False, device="meta"), [str(junk)], torch.float32, "cpu")
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors or model.safetensors"):
        streamload.checkpoint_files(str(tmp_path / "empty"))


# A Linear stack of 32 float32 2048x2048 layers: 512 MiB, a tensor 16 MiB.
LAYERS, WIDTH = 32, 2048
COMPONENT_BYTES = LAYERS * (WIDTH * WIDTH + WIDTH) * 4


def write_stack(path: Path) -> None:
    """The stack's safetensors file, written one tensor at a time (the writing process holds one)."""
    names = [(f"{i}.{leaf}", shape) for i in range(LAYERS) for leaf, shape in (("bias", [WIDTH]),
                                                                                 ("weight", [WIDTH, WIDTH]))]
    header, offset = {}, 0
    for name, shape in names:
        size = 4 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape in names:
            fh.write(torch.randn(*shape, generator=generator).numpy().tobytes())


CHILD = textwrap.dedent("""
    import json, re, resource, sys
    import torch
    from accelerate import init_empty_weights
    from worker.engine import int8, streamload

    path, how, layers, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with init_empty_weights():
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    targets = [str(i) for i in range(layers)]
    # Warm-up: the first meta-device quantisation imports torch's meta kernels (~150 MB, once per process).
    int8.Int8Linear.from_weight(torch.ones(8, 8).to("meta"), None, torch.float32, True)
    before = peak()
    if how == "whole":
        # As diffusers and transformers load a component in another dtype: every tensor copied into memory.
        from safetensors.torch import load_file
        model.load_state_dict({k: v.clone() for k, v in load_file(path).items()}, assign=True)
        int8.convert(model, torch.float32, True, pattern=re.compile(r"^\\d+$"))
    elif how == "resident":
        # The meta device stands for the GPU: what goes there leaves the host, as a resident placement's does.
        build = lambda weight, bias: int8.Int8Linear.from_weight(weight, bias, torch.float32, True)
        streamload.load_into(model, [path], torch.float32, "meta", convert=build, targets=targets)
    else:
        # Quantised off the host (the meta device standing for the GPU), the int8 layer kept on the host, as
        # a streamed placement keeps it: its memory is real, its values do not matter here.
        def build(weight, bias):
            layer = int8.Int8Linear.from_weight(weight, bias, torch.float32, True).to_empty(device="cpu")
            for tensor in layer.parameters():
                tensor.data.fill_(1)  # touched, so resident
            return layer
        streamload.load_into(model, [path], torch.float32, "cpu", convert=build, targets=targets,
                             work_device="meta")
    print(json.dumps({"grew": peak() - before}))
""")


def rss_growth(path: Path, how: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), how, str(LAYERS), str(WIDTH)], cwd=ROOT,
                         capture_output=True, text=True, timeout=240, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["grew"]


def test_loading_tensor_by_tensor_grows_host_memory_by_a_tensor_or_the_kept_int8_not_by_the_component(tmp_path):
    """Peak RSS of a fresh process loading a 512 MiB float32 Linear stack into int8 layers: read whole
    into memory (as a library loading in another dtype does) then converted, it grows by the whole
    component; read tensor by tensor for a
    resident placement, by one tensor (the staging buffer); for a streamed one, which keeps the int8
    layers on the host, by those (a quarter) and one tensor."""
    path = tmp_path / "stack.safetensors"
    write_stack(path)
    tensor_bytes = WIDTH * WIDTH * 4
    int8_bytes = LAYERS * (WIDTH * WIDTH + 2 * WIDTH * 4)
    whole = rss_growth(path, "whole")
    resident = rss_growth(path, "resident")
    streamed = rss_growth(path, "streamed")
    # The control: reading whole grows by most of the component. How much of the file's mapped pages count
    # depends on the machine's memory pressure (they are reclaimable), so the bound is loose.
    assert whole > 0.4 * COMPONENT_BYTES and whole > 3 * resident
    assert resident < 2 * tensor_bytes
    assert streamed < int8_bytes + 2 * tensor_bytes
