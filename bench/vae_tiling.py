"""What tiled VAE decoding alone does to an image (a measuring tool, not a test).

The small-card profiles decode in 512-pixel tiles (`worker.engine.placement.VAE_TILE_PX`), which blends
overlapping tiles. This decodes the same latents with the full-size Z-Image VAE architecture (random
weights, like the benchmark's pipeline) whole and tiled, and compares them with the benchmark's
fidelity measure (`bench.profiles.compare_images`, same 40 dB rule). No GPU needed: float32 on the CPU.

  python -m bench.vae_tiling [--side 1024] [--seeds 101 102] [--jsonl FILE]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.profiles import VISIBLE_PSNR_DB, compare_images, emit  # noqa: E402


def full_size_vae():
    import torch
    from diffusers import AutoencoderKL

    from worker.engine import tiny

    torch.manual_seed(tiny.SEED)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=tiny.FULL_VAE_CHANNELS, layers_per_block=2,
        latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True).eval()


def decode(vae, latents, tiled: bool):
    import torch

    from worker.engine.placement import VAE_TILE_PX

    if tiled:
        vae.enable_tiling()
        vae.tile_sample_min_size = VAE_TILE_PX
        vae.tile_latent_min_size = VAE_TILE_PX // (2 ** (len(vae.config.block_out_channels) - 1))
    else:
        vae.disable_tiling()
    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    # The pipeline's postprocessing: [-1, 1] to [0, 1], channels last.
    return (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).float().numpy()


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench.vae_tiling", description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 102])
    parser.add_argument("--jsonl")
    args = parser.parse_args(argv)
    vae = full_size_vae()
    latent_side = args.side // 8
    for seed in args.seeds:
        latents = torch.randn(1, 16, latent_side, latent_side, generator=torch.Generator().manual_seed(seed))
        t0 = time.perf_counter()
        whole = decode(vae, latents, tiled=False)
        tiled = decode(vae, latents, tiled=True)
        record = {"check": "vae_tiling", "side": args.side, "seed": seed, "tile_px": 512, "device": "cpu",
                  "dtype": "float32", **compare_images(tiled, whole), "visible_below_psnr_db": VISIBLE_PSNR_DB,
                  "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
                  "date": time.strftime("%Y-%m-%d", time.gmtime())}
        emit(record, args.jsonl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
