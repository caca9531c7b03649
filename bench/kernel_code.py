"""What the hand-written Triton kernels compile to for an H100 (sm_90), on any machine: no GPU needed.

Triton's compiler and the ptxas and nvdisasm it ships take each kernel to sm_90 machine code, with
the arguments specialised as Triton's launcher specialises them at a real launch on the DiT's shapes
(16-byte-aligned pointers, strides that are multiples of 16). For each kernel and warps setting this
prints the machine code's size, its global loads and stores by width, and whether it goes through
shared memory (barriers, shared loads and stores). It says how a kernel moves memory before any GPU
time is spent on it; it does not time anything (`bench.kernels` does, on a GPU).

  python -m bench.kernel_code [--warps 4 8 16] [--jsonl FILE]
"""
from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

H100 = ("cuda", 90, 32)  # backend, compute capability, warp size


@dataclass(frozen=True)
class KernelCase:
    module: str                      # holds the kernel (`_kernel()`, the @triton.jit function) and NUM_WARPS
    types: tuple[str, ...]           # Triton type of each argument, in order ("*bf16", "i32", "constexpr")
    constexprs: dict                 # the DiT's block sizes
    aligned: tuple[str, ...]         # arguments a real launch finds divisible by 16

    def kernel(self):
        return importlib.import_module(self.module)._kernel()

    def default_warps(self) -> int:
        return importlib.import_module(self.module).NUM_WARPS


# Z-Image: 30 heads of 128 (a 32-row block), feed-forward rows of 10240 (a 16384-wide block).
KERNELS = {
    "qk": KernelCase("worker.engine.kernels.qk_norm_rope",
                     ("*bf16",) * 3 + ("*fp32", "*bf16") + ("i32",) * 8 + ("fp32", "constexpr", "constexpr"),
                     {"HEADS_BLOCK": 32, "HEAD_DIM": 128},
                     ("qkv_ptr", "q_weight_ptr", "k_weight_ptr", "rope_ptr", "out_ptr", "qkv_batch_stride",
                      "qkv_token_stride", "rope_batch_stride", "rope_token_stride", "out_part_stride",
                      "out_batch_stride", "out_token_stride")),
    "gate": KernelCase("worker.engine.kernels.silu_gate",
                       ("*bf16", "*fp8e4nv", "*fp32", "i32", "i32", "i32", "fp32", "fp32", "constexpr"),
                       {"BLOCK": 16384}, ("gv_ptr", "out_ptr", "scale_ptr", "width", "gv_row_stride", "out_row_stride")),
}


def compile_for_h100(name: str, num_warps: int | None = None) -> dict:
    """The kernel's compiled forms, {"ptx": text, "cubin": bytes, ...}, for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    case = KERNELS[name]
    kernel = case.kernel()
    signature = dict(zip(kernel.arg_names, case.types, strict=True))
    attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in case.aligned}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=case.constexprs, attrs=attrs),
                              target=GPUTarget(*H100),
                              options={"num_warps": num_warps or case.default_warps()})
    return compiled.asm


def global_accesses(ptx: str) -> collections.Counter:
    """How many global loads and stores of each width the PTX has, e.g. {"ld.global.v4.b32": 4}."""
    return collections.Counter(re.findall(r"\b(?:ld|st)\.global(?:\.\w+)*", ptx))


def sass_summary(cubin: bytes) -> dict:
    """Instructions in the machine code, and its memory and barrier instructions by opcode."""
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([nvdisasm, "-c", file.name], capture_output=True, text=True, check=True).stdout
    opcodes = collections.Counter()
    for line in listing.splitlines():
        match = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if match:
            opcodes[match.group(1)] += 1
    memory = {op: n for op, n in sorted(opcodes.items()) if op.startswith(("LDG", "STG", "LDS", "STS", "BAR"))}
    return {"instructions": sum(opcodes.values()), "memory_ops": memory,
            "shared_memory": any(op.startswith(("LDS", "STS", "BAR")) for op in memory)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--jsonl", default="")
    args = parser.parse_args(argv)
    import triton

    from bench.profiles import emit

    for name, case in KERNELS.items():
        for warps in args.warps:
            asm = compile_for_h100(name, warps)
            emit({"tool": "kernel_code", "kernel": name, "num_warps": warps,
                  "default_warps": warps == case.default_warps(), "target": "sm_90", "triton": triton.__version__,
                  "ptx_global_accesses": dict(global_accesses(asm["ptx"])), **sass_summary(asm["cubin"])},
                 args.jsonl)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
