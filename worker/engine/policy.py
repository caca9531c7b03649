"""Which layers a lossy profile quantises: named keep-lists, from the most quantised to none.

A profile names its policy (`Spec.quant_policy`); the native fp8 conversion (`worker.engine.fp8_recipes`)
and diffusers' layerwise casting (`worker.engine.placement`) quantise only what it leaves them. Every
policy quantises only the projections inside transformer blocks (attention and feed-forward in the DiT,
self-attention and MLP in the text encoder): the patch and caption embedders, the timestep embedder,
adaLN modulation, the final layer and every norm always stay in the load dtype. The policies differ in
which whole blocks they keep too:

  blocks  none: every block quantised (the recipe before the quality gate existed, and the default)
  edges   the first and last blocks: the DiT's noise and context refiners and its first and last main
          blocks; the text encoder's first and last layers
  half    edges, and the last half of the main blocks and of the text encoder's layers (vLLM-Omni's
          Z-Image gate keeps the last 15 of 30 DiT blocks and the last 8 of 36 text-encoder layers)
  bf16    every block: nothing quantised; the profile keeps its placement with weights as loaded

A profile whose probe images fail the quality gate steps to the next policy in SAFER, then to a
lossless profile (`worker.engine.diffusion`). No torch here: the chooser's side reads the names.
"""
from __future__ import annotations

import re

BLOCKS, EDGES, HALF, BF16 = "blocks", "edges", "half", "bf16"
POLICIES = (BLOCKS, EDGES, HALF, BF16)
DEFAULT = BLOCKS
KEEPS = {BLOCKS: "embedders, adaLN, final layer and norms",
         EDGES: "those, and the first and last blocks (the DiT's refiners and first and last main blocks)",
         HALF: "those, and the last half of the main blocks",
         BF16: "every layer: nothing quantised"}
# The projections a block holds, per model: what any policy may quantise.
_DIT_PROJECTIONS = r"(attention|feed_forward)"
_TEXT_ENCODER_PROJECTIONS = r"(self_attn|mlp)"
_DIT_REFINERS = ("noise_refiner", "context_refiner")
_NOTHING = re.compile(r"(?!)")


def check(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"unknown quantisation policy {name!r} (known: {', '.join(POLICIES)})")
    return name


def safer(name: str) -> str | None:
    """The policy that keeps more layers in bf16 than `name`, or None after the last."""
    index = POLICIES.index(check(name))
    return POLICIES[index + 1] if index + 1 < len(POLICIES) else None


def quantises_anything(name: str) -> bool:
    return check(name) != BF16


def _is_dit(model) -> bool:
    return hasattr(model, "noise_refiner")


def _text_layers(model) -> tuple[str, int]:
    """(the name of a text encoder's layer list, its length): Qwen3Model's `layers`, or `model.layers`."""
    if hasattr(model, "layers"):
        return "layers", len(model.layers)
    inner = getattr(model, "model", None)
    return "model.layers", len(getattr(inner, "layers", ()))


def quantised_blocks(model, name: str) -> dict[str, list[int]]:
    """{block list name: indices of the blocks `name` lets be quantised} for a Z-Image DiT or a Qwen3
    text encoder."""
    check(name)
    if _is_dit(model):
        lists = {r: len(getattr(model, r)) for r in _DIT_REFINERS}
        lists["layers"] = len(model.layers)
        main = "layers"
    else:
        main, count = _text_layers(model)
        lists = {main: count}
    out = {}
    for list_name, count in lists.items():
        indices = set(range(count))
        if name == BF16:
            indices.clear()
        elif name in (EDGES, HALF):
            if list_name in _DIT_REFINERS:
                indices.clear()
            else:
                indices -= {0, count - 1}
                if name == HALF:
                    indices -= set(range(count // 2, count))
        out[list_name] = sorted(indices)
    return out


def pattern(model, name: str) -> re.Pattern:
    """The layer-name pattern of the projections policy `name` quantises in `model` (matching nothing
    for bf16). With `blocks` it selects what `worker.engine.fp8.DIT_TARGETS` and `TEXT_ENCODER_TARGETS`
    do."""
    projections = _DIT_PROJECTIONS if _is_dit(model) else _TEXT_ENCODER_PROJECTIONS
    alternatives = [f"{re.escape(list_name)}\\.({'|'.join(map(str, indices))})"
                    for list_name, indices in quantised_blocks(model, name).items() if indices]
    if not alternatives:
        return _NOTHING
    return re.compile(rf"^({'|'.join(alternatives)})\.{projections}\.")


def kept_patterns(model, name: str) -> tuple[str, ...]:
    """Module-name patterns of the blocks policy `name` keeps, for diffusers' layerwise casting's
    `skip_modules_pattern` (searched in each module's name)."""
    kept = []
    wanted = quantised_blocks(model, name)
    every = quantised_blocks(model, BLOCKS)
    for list_name, indices in every.items():
        for index in sorted(set(indices) - set(wanted[list_name])):
            kept.append(rf"^{re.escape(list_name)}\.{index}\.")
    return tuple(kept)
