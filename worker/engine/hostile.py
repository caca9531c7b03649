"""A "hostile" Z-Image: random weights made to show the activation statistics that break naive fp8 on
the real model, which random weights alone hide.

Public reports on Z-Image-Turbo's real weights (docs/quality.md): MLP inputs reach |x| ~ 6.6e4, where
per-tensor fp8 renders noise and per-row scaling does not; all-zero activation rows give a zero scale, and
NaN, unless the scale has a floor. `make_hostile` edits a DiT in place so that both happen, while the bf16
model stays well conditioned (its own images are the reference):

- outlier tokens: two residual channels are zero for image tokens and `RESIDUAL` for every caption token
  (the caption embedder writes them; no block's output projection writes them back), so after each
  block's feed-forward norm a caption token is nearly one-hot on them;
- MLP inputs at `PEAK`, ordinary ones small: every feed-forward norm's weight is raised on those channels
  so that a caption token's MLP input reaches `PEAK`, and lowered to `TYPICAL` on the others, as learned
  norms that make massive activations are; their adaLN scale is pinned to 1; the feed-forward's input
  columns are divided by the same factors, so the bf16 product is what it was. One such token sets a
  per-tensor scale under which every image token's inputs round to a few fp8 levels or to zero;
- zero rows: the caption padding token is all zero, so the first context-refiner block's q/k/v inputs
  hold all-zero rows wherever the caption is padded;
- a model whose blocks count, as a trained one's do: each block's adaLN gates are opened (`GATE`) and the
  final layer's output raised (`OUTPUT_GAIN`), so the DiT, not the starting noise, draws the image. A
  random DiT barely moves its images otherwise, and nothing done to it would show.

It cannot show what real weights do beyond that (outliers spread over channels, which per-row scaling
would not fix); each farm's own calibration does (`worker.calibration`).

    python -m worker.engine.hostile OUT [--from MODEL_DIR] [--n-layers 6]   # tiny unless --from
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PEAK = 6.6e4          # |x| the reports give for Z-Image's MLP inputs
RESIDUAL = 256.0      # a caption token's value on the outlier channels of the residual stream
OUTLIER_CHANNELS = 2
TYPICAL = 0.03        # the feed-forward norm's weight on every other channel
GATE = 2.0            # added to the blocks' adaLN gate biases: tanh(2) = 0.96
OUTPUT_GAIN = 4.0     # the final layer's weights times this
# The tiny hostile model's DiT: six main blocks, so that the policies between "blocks" and "bf16" differ,
# and a width whose feed-forward (8/3 of it) is a multiple of 16, so that fp8 recipes convert it.
TINY_LAYERS = 6
TINY_DIT = {"dim": 96, "n_heads": 3, "n_kv_heads": 3}


def outlier_channels(dim: int, count: int = OUTLIER_CHANNELS) -> list[int]:
    """Which residual channels carry the outliers: spread over the width, the same for every build."""
    return [(i + 1) * dim // (count + 1) for i in range(count)]


def _blocks(transformer):
    for list_name in ("noise_refiner", "context_refiner", "layers"):
        yield from getattr(transformer, list_name, ())


def make_hostile(transformer) -> dict:
    """Edit a Z-Image DiT in place (on whatever device and dtype it is) as the module docstring says.
    Deterministic: two calls on the same weights give the same model. Returns what was done."""
    import torch

    dim = transformer.config.dim
    channels = outlier_channels(dim)
    # A caption token after RMS normalisation: nearly one-hot over the outlier channels.
    gain = PEAK / math.sqrt(dim / len(channels))
    with torch.no_grad():
        for embedder in transformer.all_x_embedder.values():
            embedder.weight[channels, :] = 0
            embedder.bias[channels] = 0
        caption = transformer.cap_embedder[1]
        caption.weight[channels, :] = 0
        caption.bias[channels] = RESIDUAL
        transformer.x_pad_token[:, channels] = 0
        transformer.cap_pad_token.zero_()
        for block in _blocks(transformer):
            block.attention.to_out[0].weight[channels, :] = 0
            block.feed_forward.w2.weight[channels, :] = 0
            # In place, scaled whole then mended on the outlier channels: no copy of a 10240x3840 weight.
            block.ffn_norm1.weight.mul_(TYPICAL)
            block.ffn_norm1.weight[channels] = gain
            for projection in (block.feed_forward.w1, block.feed_forward.w3):
                projection.weight.div_(TYPICAL)
                projection.weight[:, channels] *= TYPICAL / gain
            if block.modulation:
                # adaLN's output chunks: scale_msa, gate_msa, scale_mlp, gate_mlp.
                modulation = block.adaLN_modulation[0]
                scale_mlp = [2 * dim + c for c in channels]
                modulation.weight[scale_mlp, :] = 0   # scale 1 + 0 on the outlier channels
                modulation.bias[scale_mlp] = 0
                modulation.bias[dim:2 * dim] += GATE
                modulation.bias[3 * dim:] += GATE
        for final in transformer.all_final_layer.values():
            final.linear.weight *= OUTPUT_GAIN
            final.linear.bias *= OUTPUT_GAIN
    return {"channels": channels, "peak": PEAK, "residual": RESIDUAL, "typical": TYPICAL, "gate": GATE,
            "output_gain": OUTPUT_GAIN, "norm_gain": round(gain, 1)}


class LinearInputs:
    """While active, records over every block projection's input: the largest |x| at the feed-forward's
    inputs and elsewhere, and how many all-zero rows went in. For tests and the benchmark's report."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.mlp_max_abs = 0.0
        self.other_max_abs = 0.0
        self.zero_rows = 0
        self._handles = []

    def __enter__(self) -> "LinearInputs":
        for name, module in self.transformer.named_modules():
            if name.count(".") >= 3 and (".feed_forward." in name or ".attention." in name) and \
                    hasattr(module, "in_features"):
                self._handles.append(module.register_forward_pre_hook(self._hook(".feed_forward.w" in name
                                                                                  and not name.endswith("w2"))))
        return self

    def _hook(self, mlp_input: bool):
        def record(_module, args):
            x = args[0].detach().float()
            peak = float(x.abs().amax()) if x.numel() else 0.0
            if mlp_input:
                self.mlp_max_abs = max(self.mlp_max_abs, peak)
            else:
                self.other_max_abs = max(self.other_max_abs, peak)
            self.zero_rows += int((x.reshape(-1, x.shape[-1]).abs().amax(dim=1) == 0).sum())
        return record

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def to_dict(self) -> dict:
        return {"mlp_input_max_abs": round(self.mlp_max_abs, 1), "other_input_max_abs": round(self.other_max_abs, 1),
                "zero_rows": self.zero_rows}


def build(out: str | Path, source: str | Path | None = None, n_layers: int = TINY_LAYERS) -> dict:
    """Write a hostile model to `out`: `source` (a ZImagePipeline folder) made hostile, or, without one,
    a tiny random pipeline with `n_layers` main blocks made hostile."""
    from diffusers import ZImagePipeline

    from worker.engine import tiny

    out = Path(out)
    if source is None:
        tiny.build_tiny(out, n_layers=n_layers, **TINY_DIT)
        source = out
    pipe = ZImagePipeline.from_pretrained(str(source))
    done = make_hostile(pipe.transformer)
    pipe.save_pretrained(out, safe_serialization=True)
    return {"dir": str(out), "source": str(source), **done}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.engine.hostile", description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--from", dest="source", help="a ZImagePipeline folder to make hostile (default: a tiny one)")
    parser.add_argument("--n-layers", type=int, default=TINY_LAYERS, help="main blocks of the tiny model")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.out, args.source, args.n_layers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
