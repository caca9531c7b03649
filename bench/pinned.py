"""Pinned host memory of the streamed profiles, predicted on the CPU (a measuring tool, not a test).

diffusers' group offload keeps a pinned host copy of every streamed tensor, pinned one tensor at a
time (`Tensor.pin_memory`), and torch's pinned allocator rounds each block up to the next power of two
(pytorch/pytorch#150517). This builds the full-size DiT and text encoder on the meta device (no
memory), gives each streamed component its profile's weight form with the worker's own code
(`worker.engine.placement.convert_weights`: native or layerwise fp8, fused projections), and sums its tensors
three ways: exact, rounded as torch rounds by default, and rounded only up to
`worker.engine.placement.PINNED_ROUND_MAX_MB` (the `pinned_exact` profile field).

  python -m bench.pinned [PROFILE ...] [--jsonl FILE]     # default: every profile with pinned copies
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.profiles import emit  # noqa: E402

MIB = 2**20


def next_power_of_two(n_bytes: int) -> int:
    return 1 << (n_bytes - 1).bit_length() if n_bytes > 1 else n_bytes


def pinned_bytes(tensor_bytes: list[int], round_max_bytes: int | None) -> int:
    """What torch's pinned allocator takes for these tensors pinned one by one: each block rounded up
    to a power of two, or, with `round_max_bytes`, only blocks up to that size."""
    return sum(next_power_of_two(n) if round_max_bytes is None or n <= round_max_bytes else n
               for n in tensor_bytes)


def tensor_sizes(module) -> list[int]:
    """Bytes of each parameter and buffer, as group offload pins them (one block each)."""
    return [t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers())]


def _pinned_copy(where: str) -> bool:
    """Whether a placement streams from pinned host copies. The `_lowmem` placements pin on the fly
    instead, a group at a time, so their pinned memory is small and not predicted here."""
    from worker.engine import specs

    return where not in specs.RESIDENT and not where.endswith("_lowmem")


def keeps_pinned_copies(spec) -> bool:
    """Whether a profile holds pinned copies of streamed weights."""
    return not spec.recipe and any(_pinned_copy(p) for p in (spec.transformer, spec.text_encoder))


def streamed_components(profile: str, transformer_cfg: dict, text_cfg: dict, vocab: int) -> dict:
    """{component: its tensors' sizes in bytes} for each component `profile` streams from pinned copies,
    built on the meta device in the weight form the profile gives it."""
    import torch

    from worker.engine import placement, specs, tiny

    spec = specs.spec_for(profile)
    placements = {"transformer": spec.transformer, "text_encoder": spec.text_encoder}
    out = {}
    for name, where in placements.items():
        if not _pinned_copy(where):
            continue
        with torch.device("meta"):
            if name == "transformer":
                module = tiny.transformer_model(transformer_cfg, torch.bfloat16)
            else:
                module = tiny.text_encoder_model(text_cfg, vocab, torch.bfloat16)
        placement.convert_weights(module, where, "meta", torch.bfloat16, spec, host="meta")
        out[name] = tensor_sizes(module)
    return out


def predict(profile: str, transformer_cfg: dict, text_cfg: dict, vocab: int) -> dict:
    from worker.engine import placement

    gib = lambda n: round(n / 2**30, 2)  # noqa: E731
    components = streamed_components(profile, transformer_cfg, text_cfg, vocab)
    sizes = [n for component in components.values() for n in component]
    exact = sum(sizes)
    rounded = pinned_bytes(sizes, None)
    capped = pinned_bytes(sizes, placement.PINNED_ROUND_MAX_MB * MIB)
    return {"check": "pinned", "profile": profile, "streamed": sorted(components), "tensors": len(sizes),
            "exact_gib": gib(exact), "pinned_default_gib": gib(rounded), "pinned_exact_gib": gib(capped),
            "saved_gib": gib(rounded - capped), "date": time.strftime("%Y-%m-%d", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    from worker.engine import specs, tiny

    streaming = [name for name in specs.SPECS if keeps_pinned_copies(specs.spec_for(name))]
    parser = argparse.ArgumentParser(prog="python -m bench.pinned", description=__doc__.splitlines()[0])
    parser.add_argument("profiles", nargs="*", default=streaming)
    parser.add_argument("--jsonl", default="")
    args = parser.parse_args(argv)
    for profile in args.profiles:
        emit(predict(profile, tiny.FULL_TRANSFORMER, tiny.FULL_TEXT_ENCODER, tiny.FULL_VOCAB), args.jsonl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
