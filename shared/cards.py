"""The cards people run zfarm on, their vendor figures, and a model of the speed each would reach.

Every speed in the profile table was measured on the measuring card (an H100 or H200) under a memory
cap: it proves that a profile fits a class, not how fast a smaller card renders. `expected_s_per_image`
scales a measured row to another card from public figures: dense tensor throughput at the precision
the profile multiplies in, memory bandwidth, and PCIe bandwidth for the weights a streamed profile
copies each image. It is a model, labelled so wherever it is shown; a worker's own moving average
(`registry.record_render_time`) replaces it as soon as the card has rendered.

Figures are dense (no sparsity) tensor rates from vendor data sheets, with float32 accumulation where
GeForce cards halve it; approximate, and not verified on the cards themselves.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

GIB = 2**30
# Share of the measured DiT time that scales with matmul throughput (matmuls and attention in the
# measuring card's kernel traces); the rest scales with memory bandwidth.
DIT_COMPUTE_SHARE = 0.75
# Bytes of one denoising step's weights, by how the DiT stores them (GiB): bf16, or 8-bit (fp8, int8).
DIT_GIB = {"bf16": 11.5, "8bit": 6.2}
TEXT_ENCODER_GIB = {"bf16": 7.5, "8bit": 4.1}
# What a PCIe link moves in practice, as a share of its nominal rate.
PCIE_EFFICIENCY = 0.8
# The text encoder's work for one 512-token prompt (Qwen3-4B: 2 x 4.0 B weights x 512 tokens), in TFLOP.
TEXT_ENCODER_TFLOP = 4.1


@dataclass(frozen=True)
class Card:
    name: str
    arch: str                 # "sm_86"
    vram_gb: int
    bf16_tflops: float        # dense; float16 for Turing (no bf16)
    fp8_tflops: float | None  # None: no fp8 tensor cores
    int8_tops: float
    fp32_tflops: float        # plain CUDA cores: what a float32 profile multiplies with
    memory_gbs: float
    pcie_gbs: float           # nominal, one direction

    def to_dict(self) -> dict:
        return asdict(self)


CARDS: tuple[Card, ...] = (
    Card("H100 SXM 80GB", "sm_90", 80, 989, 1979, 1979, 67, 3350, 64),
    Card("H100 PCIe 80GB", "sm_90", 80, 756, 1513, 1513, 51, 2000, 64),
    Card("H200 141GB", "sm_90", 141, 989, 1979, 1979, 67, 4800, 64),
    Card("B200 180GB", "sm_100", 180, 2250, 4500, 4500, 80, 8000, 64),
    Card("A100 80GB", "sm_80", 80, 312, None, 624, 19.5, 2039, 32),
    Card("A100 40GB", "sm_80", 40, 312, None, 624, 19.5, 1555, 32),
    Card("A10 24GB", "sm_86", 24, 125, None, 250, 31, 600, 32),
    Card("A40 48GB", "sm_86", 48, 150, None, 299, 37, 696, 32),
    Card("L4 24GB", "sm_89", 24, 121, 242, 242, 30, 300, 32),
    Card("L40S 48GB", "sm_89", 48, 362, 733, 733, 91, 864, 32),
    Card("RTX 3060 12GB", "sm_86", 12, 25.6, None, 102, 12.7, 360, 32),
    Card("RTX 3090 24GB", "sm_86", 24, 35.6, None, 284, 35.6, 936, 32),
    Card("RTX 4060 Ti 16GB", "sm_89", 16, 44, 88, 177, 22, 288, 16),
    Card("RTX 4090 24GB", "sm_89", 24, 165, 330, 660, 82.6, 1008, 32),
    Card("RTX 5090 32GB", "sm_120", 32, 209, 419, 838, 105, 1792, 64),
    Card("RTX 2080 Ti 11GB", "sm_75", 11, 26.9, None, 215, 13.4, 616, 16),
    Card("T4 16GB", "sm_75", 16, 65, None, 130, 8.1, 320, 16),
)
# The card a table row was measured on, by the name CUDA reports.
_MEASURING = {"H100 80GB HBM3": "H100 SXM 80GB", "H100 PCIe": "H100 PCIe 80GB", "H200": "H200 141GB"}


def _key(text: str) -> str:
    text = text.lower().replace("nvidia", "").replace("geforce", "").replace("tesla", "")
    return re.sub(r"[^a-z0-9]", "", text)


def find(name: str) -> Card | None:
    """The card `name` means ("NVIDIA GeForce RTX 3060", "rtx3060", "T4"), or None. A name that matches
    several (an "A100" of unknown size) gives the first listed."""
    wanted = _key(name)
    if not wanted:
        return None
    labels = [(card, _key(card.name.rsplit(" ", 1)[0])) for card in CARDS]  # names without the memory size
    exact = [card for card, label in labels if wanted in (label, _key(card.name))]
    if exact:
        return exact[0]
    # A longer name CUDA reports ("A100-SXM4-80GB"): the longest listed name it starts with.
    prefixed = sorted(((len(label), card) for card, label in labels if wanted.startswith(label)), key=lambda x: -x[0])
    if prefixed:
        return prefixed[0][1]
    measured = next((c for reported, c in _MEASURING.items() if _key(reported) in wanted), None)
    return next((c for c in CARDS if c.name == measured), None)


def cards_for(arch: str, vram_class) -> list[Card]:
    """Listed cards of `arch` ("sm_86") whose memory puts them in `vram_class` (the largest class they
    reach, as `profiles.class_for_vram` reads them)."""
    from shared import profiles

    return [c for c in CARDS if c.arch == arch and profiles.class_for_vram(c.vram_gb * 0.97) == vram_class]


def _matmul_rate(card: Card, precision: str) -> float:
    if precision == "fp8" and card.fp8_tflops:
        return card.fp8_tflops
    if precision == "int8":
        return card.int8_tops
    if precision == "fp32":
        return card.fp32_tflops
    return card.bf16_tflops


def _dit_precision(spec: dict, on: Card) -> str:
    dit = spec.get("transformer", "gpu")
    if dit.startswith("fp8mm"):
        return "fp8" if on.fp8_tflops else "bf16"
    if dit.startswith("int8mm"):
        return "int8"
    if spec.get("compute_dtype") == "float32":
        return "fp32"
    return "bf16"


def _gib_streamed(placement: str, sizes: dict) -> float:
    """Bytes (GiB) a component of this placement copies over PCIe each time it runs; 0 when resident."""
    if "stream" not in placement:
        return 0.0
    return sizes["8bit" if placement.startswith(("fp8", "int8")) else "bf16"]


def expected_s_per_image(row: dict, card: Card) -> dict | None:
    """A modelled s/img for `card` running the profile of table row `row` (1024x1024, 8 steps), with how
    it was reached; None when the row has no speed or its measuring card is not known.

    Each stage of the measured image is scaled on its own: the DiT loop by the matmul rate at its
    precision (with a memory-bandwidth share), paced by PCIe when its weights stream every step; the
    text encoder by its compute at the card's bf16 rate plus its copy when streamed; the VAE decode
    by the bf16 rate. Whole-pipeline offload recipes are paced by PCIe."""
    measured_on = find(row.get("device") or "")
    if row.get("s_per_image") is None or measured_on is None:
        return None
    spec = row.get("spec") or {}
    stages = row.get("stages_s") or {}
    steps = int(row.get("steps") or 8)
    te_s = stages.get("text_encoder", 0.0)
    vae_s = stages.get("vae_decode", 0.0)
    dit_s = stages.get("dit_loop", max(0.0, row["s_per_image"] - te_s - vae_s))
    precision = _dit_precision(spec, card)
    precision_there = _dit_precision(spec, measured_on)
    rest = "fp32" if spec.get("compute_dtype") == "float32" else "bf16"
    pcie_bytes_s = card.pcie_gbs * 1e9 * PCIE_EFFICIENCY

    compute = _matmul_rate(measured_on, precision_there) / _matmul_rate(card, precision)
    memory = measured_on.memory_gbs / card.memory_gbs
    dit = dit_s * (DIT_COMPUTE_SHARE * compute + (1 - DIT_COMPUTE_SHARE) * memory)
    dit_copy = _gib_streamed(spec.get("transformer", "gpu"), DIT_GIB) * steps * GIB / pcie_bytes_s
    dit = max(dit, dit_copy)  # group offload copies the next blocks while the current ones compute
    te_copy = _gib_streamed(spec.get("text_encoder", "gpu"), TEXT_ENCODER_GIB) * GIB / pcie_bytes_s
    te = TEXT_ENCODER_TFLOP / _matmul_rate(card, rest) + te_copy if te_copy else \
        te_s * _matmul_rate(measured_on, "bf16") / _matmul_rate(card, rest)
    vae = vae_s * _matmul_rate(measured_on, "bf16") / _matmul_rate(card, rest)
    # What no stage accounts for (the scheduler, Python between stages) runs on the host: kept as measured.
    host_s = max(0.0, row["s_per_image"] - dit_s - te_s - vae_s)
    expected = dit + te + vae + host_s
    if spec.get("recipe") in ("model_offload", "sequential"):
        moved = DIT_GIB["bf16"] * (steps if spec["recipe"] == "sequential" else 1) + TEXT_ENCODER_GIB["bf16"]
        expected = max(expected, moved * GIB / pcie_bytes_s)
    streamed = dit_copy + te_copy
    return {"card": card.name, "s_per_image": round(expected, 2), "model": True,
            "basis": (f"{row['s_per_image']} s/img measured on {measured_on.name}; DiT matmuls in {precision} "
                      f"({_matmul_rate(card, precision):g} vs {_matmul_rate(measured_on, precision_there):g} T/s), "
                      f"memory {card.memory_gbs:g} vs {measured_on.memory_gbs:g} GB/s"
                      + (f", {streamed:.1f} s of weights over PCIe at {card.pcie_gbs:g} GB/s" if streamed else ""))}
