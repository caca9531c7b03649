"""Random-weight ZImagePipelines of the real classes and on-disk format.

`build_tiny(dir)` writes a small pipeline (well under 10 MB) for tests and demos: the real
`ZImageTransformer2DModel`, `Qwen3Model` text encoder, 16-channel `AutoencoderKL` and
`FlowMatchEulerDiscreteScheduler(shift=3.0)`, with a small word-level tokenizer that carries a
Qwen-style chat template. Its weights are random (seeded, so every build is identical): it RENDERS
NOISE. It exists so that loading, offload profiles, seeds, PNG metadata and the out-of-memory path can
be exercised on a CPU in seconds.

`build_full(dir)` writes the published architecture (6.15 B DiT, Qwen3-4B text encoder, Flux VAE)
with random bf16 weights, about 20 GB: same compute and memory as Z-Image-Turbo, noise for pixels. The
GPU benchmark (`bench/profiles.py`) measures the profiles on it.

    python -m worker.engine.tiny DIR            # tiny
    python -m worker.engine.tiny --full DIR     # full size (a GPU makes it much faster to build)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Words the tokenizer knows; anything else becomes [UNK]. Enough for test and benchmark prompts.
WORDS = ("a the of and in on with at by cat dog city neon light river mountain painting portrait photo "
         "cyberpunk night sunset forest ocean snow tree house street girl boy old man woman red blue green "
         "gold silver glass steel 8k high definition cinematic detailed chinese traditional ink watercolor "
         "oil style lens bokeh studio soft hard shadow rain fog lantern bridge temple garden flower sky "
         "cloud moon star fire water stone wood").split()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SEED = 0

# axes_lens as the published model has them (diffusers' default): the first axis numbers the prompt's
# tokens (up to the pipeline's 512) and then the image's, so a shorter one failed every prompt of more
# than ~255 tokens; the other two cover the latent rows and columns of a 2048 px side.
TINY_TRANSFORMER = dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                        axes_dims=[8, 12, 12], axes_lens=[1024, 512, 512])
TINY_TEXT_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, max_position_embeddings=1024)
TINY_VAE_CHANNELS = [32, 32, 32, 32]

# The published Z-Image-Turbo configuration (transformer defaults are the published ones).
FULL_TRANSFORMER: dict = {}
FULL_TEXT_ENCODER = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, max_position_embeddings=40960)
FULL_VAE_CHANNELS = [128, 256, 512, 512]
FULL_VOCAB = 151936


def _tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(set(WORDS)) + ["user", "assistant", ",", "."])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def transformer_model(transformer_cfg: dict, dtype):
    """A random-weight Z-Image DiT of this architecture, on the current default device."""
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(**transformer_cfg).to(dtype)


def text_encoder_model(text_cfg: dict, vocab: int, dtype):
    """A random-weight Qwen3 text encoder of this architecture, on the current default device."""
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(vocab_size=vocab, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                  tie_word_embeddings=True, **text_cfg)).to(dtype)


def _build(out: str | Path, transformer_cfg: dict, text_cfg: dict, vae_channels: list, vae_layers: int,
           vocab: int | None, dtype, device: str) -> dict:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(out)
    t0 = time.monotonic()
    torch.manual_seed(SEED)
    with torch.device(device):
        transformer = transformer_model(transformer_cfg, dtype)
        text_encoder = text_encoder_model(text_cfg, vocab or len(tokenizer), dtype)
        # sample_size 1024 as in the published VAE config: it sets the VAE's tile size when tiling is on.
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=vae_channels, layers_per_block=vae_layers,
            latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True).to(dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    init_s = time.monotonic() - t0
    pipe.save_pretrained(out, safe_serialization=True)

    def billions(module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e9, 4)

    return {"dir": str(out), "dtype": str(dtype).replace("torch.", ""), "transformer_b": billions(transformer),
            "text_encoder_b": billions(text_encoder), "vae_b": billions(vae), "init_s": round(init_s, 1),
            "save_s": round(time.monotonic() - t0 - init_s, 1)}


def build_tiny(out: str | Path, **transformer: int) -> dict:
    """Write the tiny random pipeline (float32, seeded) to `out`; returns a summary. `transformer` changes
    the DiT's configuration (n_layers=6: more main blocks)."""
    import torch

    return _build(out, {**TINY_TRANSFORMER, **transformer}, TINY_TEXT_ENCODER, TINY_VAE_CHANNELS, 1, None,
                  torch.float32, "cpu")


def build_full(out: str | Path, device: str | None = None) -> dict:
    """Write the full-size random pipeline (bf16) to `out`. Building on the GPU takes seconds where
    the CPU takes many minutes; the files are the same either way up to the random draw."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    summary = _build(out, FULL_TRANSFORMER, FULL_TEXT_ENCODER, FULL_VAE_CHANNELS, 2, FULL_VOCAB, torch.bfloat16, device)
    if device == "cuda":
        torch.cuda.empty_cache()
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.engine.tiny",
                                     description="Write a random-weight ZImagePipeline (it renders noise).")
    parser.add_argument("dir")
    parser.add_argument("--full", action="store_true", help="full-size architecture, bf16 (about 20 GB)")
    args = parser.parse_args(argv)
    summary = build_full(args.dir) if args.full else build_tiny(args.dir)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
