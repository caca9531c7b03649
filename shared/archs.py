"""GPU architectures and what each can do: the capabilities a profile may need.

A profile declares what it needs (`worker.engine.specs.requirements`, recorded in each row of the
profile table); a card offers what its architecture and the installed torch and Triton allow
(`capabilities`). The chooser takes only profiles whose needs are met. No torch here: the producer's
`zfarm profiles --arch sm_86` answers for a card that is not present, and the worker's parent decides
before any CUDA context exists (compute capability from NVML, versions from package metadata).

The facts and their sources are in docs/profiles.md ("Architectures"). Where a fact is unknown for an
architecture (row-wise fp8 matmul on consumer Blackwell with the torch we ship), the capability is not
offered: a profile that needs it is never chosen there, and the boot self-test would catch it anyway.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import UsageError

# Capabilities, as profile rows name them.
CUDA = "cuda"                  # a CUDA GPU
BF16 = "bf16"                  # native bf16 arithmetic (compute capability 8.0 and up)
TRITON = "triton"              # torch.compile's Triton code generation for this card
TRITON_E4M3 = "triton_e4m3"    # Triton code that loads or stores float8_e4m3fn (8.9 and up)
FP8_MATMUL = "fp8_matmul"      # torch._scaled_mm on fp8 tensor cores with row-wise scales
INT8_MATMUL = "int8_matmul"    # torch._int_mm on int8 tensor cores
CUDNN_ATTENTION = "cudnn_attention"  # torch's cuDNN attention op (8.0 and up)
CUDA_GRAPHS = "cuda_graphs"    # capturing and replaying CUDA graphs
CAPABILITIES = (CUDA, BF16, TRITON, TRITON_E4M3, FP8_MATMUL, INT8_MATMUL, CUDNN_ATTENTION, CUDA_GRAPHS)
# A requirement may also name a minimum version: "torch>=2.6".
_VERSION_NEED = re.compile(r"^(torch|triton)>=(\d+(?:\.\d+)*)$")


@dataclass(frozen=True)
class Arch:
    compute_capability: tuple[int, int]
    family: str
    cards: str                 # typical cards, for messages and docs
    fp8_tensor_cores: bool
    # The first torch release whose torch._scaled_mm takes row-wise scales on this architecture; None
    # where no release is known to (then fp8 matmul profiles are never chosen here).
    rowwise_fp8_torch: str | None

    @property
    def name(self) -> str:
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch((7, 5), "Turing", "T4, RTX 2060/2070/2080 (Ti), Quadro RTX", False, None),
    Arch((8, 0), "Ampere", "A100, A800, A30", False, None),
    Arch((8, 6), "Ampere", "RTX 3060/3070/3080/3090, A10, A40, RTX A4000-A6000", False, None),
    Arch((8, 7), "Ampere", "Jetson AGX Orin", False, None),
    Arch((8, 9), "Ada", "RTX 4060 Ti/4070/4080/4090, L4, L40S, RTX 6000 Ada", True, "2.5"),
    Arch((9, 0), "Hopper", "H100, H200, GH200", True, "2.4"),
    Arch((10, 0), "Blackwell (datacenter)", "B200, GB200", True, "2.7"),
    Arch((12, 0), "Blackwell (consumer)", "RTX 5070/5080/5090, RTX PRO 6000", True, None),
)}


def arch_name(compute_capability: str | tuple[int, int]) -> str:
    """"sm_86" from "8.6" or (8, 6)."""
    if isinstance(compute_capability, str):
        major, _, minor = compute_capability.partition(".")
        compute_capability = (int(major), int(minor or 0))
    return f"sm_{compute_capability[0]}{compute_capability[1]}"


def parse_arch(text: str) -> Arch:
    """The architecture `text` names: "sm_86", "sm86", "8.6" or "86". Unknown ones are refused."""
    cleaned = text.strip().lower().replace("sm_", "").replace("sm", "")
    if re.fullmatch(r"\d+\.\d+", cleaned):
        name = arch_name(cleaned)
    elif re.fullmatch(r"\d{2,3}", cleaned):
        name = f"sm_{cleaned}"
    else:
        name = text
    if name not in ARCHS:
        raise UsageError(f"unknown GPU architecture {text!r} (known: {', '.join(ARCHS)})")
    return ARCHS[name]


def version_tuple(version: str) -> tuple[int, ...]:
    """(2, 11, 0) from "2.11.0+cu130"; () when there is none."""
    numbers = re.match(r"^(\d+(?:\.\d+)*)", version or "")
    return tuple(int(n) for n in numbers.group(1).split(".")) if numbers else ()


@dataclass(frozen=True)
class Capabilities:
    """What one card, with the installed torch and Triton, can do."""

    arch: str                   # "sm_86", or "cpu"
    features: frozenset
    torch: str = ""
    triton: str = ""
    emulated_on: str = ""       # the real architecture when `arch` is emulated (ZFARM_EMULATE_ARCH)

    def meets(self, requirement: str) -> bool:
        versioned = _VERSION_NEED.match(requirement)
        if versioned:
            have = version_tuple(self.torch if versioned.group(1) == "torch" else self.triton)
            return bool(have) and have >= version_tuple(versioned.group(2))
        return requirement in self.features

    def missing(self, requires) -> list[str]:
        """The requirements in `requires` this card does not meet."""
        return [r for r in requires if not self.meets(r)]

    def to_dict(self) -> dict:
        return {"arch": self.arch, "features": sorted(self.features), "torch": self.torch, "triton": self.triton,
                "emulated_on": self.emulated_on}


def capabilities(arch: str, torch_version: str = "", triton_version: str = "", emulated_on: str = "") -> Capabilities:
    """The capabilities of a card of architecture `arch` ("sm_86"; "cpu" for none)."""
    if arch == "cpu":
        return Capabilities("cpu", frozenset(), torch_version, triton_version)
    spec = ARCHS.get(arch)
    if spec is None:  # a newer card than this table knows: only what every CUDA card of ours has
        return Capabilities(arch, frozenset({CUDA, CUDA_GRAPHS}), torch_version, triton_version, emulated_on)
    cc = spec.compute_capability
    features = {CUDA, CUDA_GRAPHS}
    if cc >= (8, 0):
        features |= {BF16, CUDNN_ATTENTION}
    if cc >= (7, 5) and triton_version:
        features.add(TRITON)
    if cc >= (8, 9) and triton_version:
        features.add(TRITON_E4M3)
    if cc >= (7, 5):
        features.add(INT8_MATMUL)   # cuBLASLt's int8 kernels behind torch._int_mm: Turing and later
    torch_now = version_tuple(torch_version)
    if spec.fp8_tensor_cores and spec.rowwise_fp8_torch and torch_now >= version_tuple(spec.rowwise_fp8_torch):
        features.add(FP8_MATMUL)
    return Capabilities(arch, frozenset(features), torch_version, triton_version, emulated_on)
