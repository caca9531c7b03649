"""Kernel timings behind the DiT's speed, on a GPU (a measuring tool, not a test).

One Z-Image block at 1024x1024 works on 4096 image + up to 512 caption tokens (4224 with a short
caption), model width 3840, 30 heads of 128, feed-forward 10240. This times, on those exact shapes:
  - attention with each of torch's SDPA kernels (flash, cuDNN, memory-efficient), bf16;
  - the block's matmuls in bf16 and in native fp8 (worker.engine.fp8: row-wise scales, _scaled_mm), separate
    and fused (q/k/v as one, w1/w3 as one), with and without fast accumulation;
  - the feed-forward's gate and its fp8 row scaling, compiled by inductor and as worker.engine.kernels.silu_gate'
    hand-written kernel;
  - the q/k head norms with the rotary embedding, compiled by inductor and as worker.engine.kernels.qk_norm_rope's
    hand-written kernel.
Each line is printed with its TFLOP/s and appended to --jsonl.

  python -m bench.kernels [--tokens 4224] [--jsonl FILE] [--only attention|matmul|gate|qk]
"""
from __future__ import annotations

import argparse
import time

DIM, HEADS, HEAD_DIM, FFN = 3840, 30, 128, 10240


def _time_ms(fn, repeats: int = 50) -> float:
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def attention_rows(tokens: int) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flop = 4 * tokens * tokens * HEAD_DIM * HEADS
    rows = []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                ms = _time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
            rows.append({"kernel": f"attention {name}", "ms": round(ms, 3), "tflops": round(flop / ms / 1e9, 1)})
        except RuntimeError as exc:
            rows.append({"kernel": f"attention {name}", "error": " ".join(str(exc).split())[:200]})
    return rows


def matmul_rows(tokens: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from worker.engine import fp8

    x = torch.randn(tokens, DIM, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(tokens, FFN, device="cuda", dtype=torch.bfloat16)
    rows = []

    def weight(n_out, n_in):
        return torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) / n_in ** 0.5

    groups = {  # name: (input, [output widths]) ; fused = one layer of the summed width
        "qkv": (x, [DIM, DIM, DIM]), "w1w3": (x, [FFN, FFN]), "out": (x, [DIM]), "w2": (h, [DIM])}
    for name, (inp, widths) in groups.items():
        n_in = inp.shape[1]
        flop = 2 * tokens * n_in * sum(widths)
        linears = [torch.nn.Linear(n_in, w, bias=False, device="cuda", dtype=torch.bfloat16) for w in widths]
        for lin, w in zip(linears, widths):
            lin.weight.data = weight(w, n_in)
        variants = {"bf16": lambda: [F.linear(inp, lin.weight) for lin in linears]}
        if len(linears) > 1:
            from worker.engine.fuse import concat_linears

            fused_bf16 = concat_linears(linears)
            variants["bf16 fused"] = lambda f=fused_bf16: F.linear(inp, f.weight)
        # fp8: the matmuls alone, on an input scaled and rounded once beforehand (in the compiled blocks
        # that rounding is fused into the kernel before, so it is left out here).
        rows_fp8, scale_a = fp8.quantize_rows(inp)
        layers = [fp8.Fp8Linear.from_linear(lin, torch.bfloat16, True) for lin in linears]
        fused = fp8.Fp8Linear.concat(layers) if len(layers) > 1 else None
        for fast in (False, True):
            tag = "fp8" + (" fast" if fast else "")
            variants[tag] = (lambda f=fast: [_scaled(rows_fp8, scale_a, layer, f) for layer in layers])
            if fused is not None:
                variants[tag + " fused"] = (lambda f=fast: _scaled(rows_fp8, scale_a, fused, f))
        for tag, fn in variants.items():
            ms = _time_ms(fn)
            rows.append({"kernel": f"{name} {tag}", "ms": round(ms, 3), "tflops": round(flop / ms / 1e9, 1)})
    return rows


def gate_rows(tokens: int) -> list[dict]:
    """The feed-forward's gate, silu(w1 x) * w3 x scaled and rounded to fp8 row by row, as the compiled
    blocks ran it (inductor) and as worker.engine.kernels.silu_gate' kernel runs it, with the kernel's warps varied.
    GB/s counts the bytes that must move: the fused w1/w3 output read once, fp8 rows and scales written.
    `fp8_equal` is the share of fp8 values identical to inductor's; `max_rel_err` the largest
    difference of the dequantised rows, relative to the largest value of the whole tensor."""
    import torch

    from worker.engine.kernels import silu_gate

    gate_value = torch.randn(tokens, 2 * FFN, device="cuda", dtype=torch.bfloat16) * 2
    moved = tokens * (2 * FFN * 2 + FFN + 4)
    compiled = torch.compile(silu_gate.reference, fullgraph=True)
    expect_fp8, expect_scale = compiled(gate_value)
    expected = expect_fp8.float() * expect_scale
    variants = {"gate eager": lambda: silu_gate.reference(gate_value), "gate compiled": lambda: compiled(gate_value)}
    for warps in (4, 8, 16, 32):
        variants[f"gate kernel {warps} warps"] = lambda w=warps: silu_gate.run_kernel(gate_value, num_warps=w)
    rows = []
    for tag, fn in variants.items():
        got_fp8, got_scale = fn()
        ms = _time_ms(fn)
        rows.append({"kernel": tag, "ms": round(ms, 4), "gb_s": round(moved / ms / 1e6),
                     "fp8_equal": round((got_fp8.view(torch.uint8) == expect_fp8.view(torch.uint8)).float().mean().item(), 6),
                     "max_rel_err": float((got_fp8.float() * got_scale - expected).abs().max() / expected.abs().max())})
    return rows


def qk_rows(tokens: int) -> list[dict]:
    """q and k's head norms and rotary embedding, as eager runs them, as the compiled blocks ran them
    (inductor) and as worker.engine.kernels.qk_norm_rope's kernel runs them (warps varied; `inline` is the triton_op
    compiled, as a block launches it). GB/s counts q and k read and written once and the rotation's
    factors read. `bf16_equal` is the share of values identical to eager's; `max_rel_err` the largest
    difference relative to the largest value."""
    import torch

    from worker.engine.kernels import qk_norm_rope

    qkv = torch.randn(1, tokens, 3 * DIM, device="cuda", dtype=torch.bfloat16) * 2
    q_weight = (1 + 0.1 * torch.randn(HEAD_DIM, device="cuda")).to(torch.bfloat16)
    k_weight = (1 + 0.1 * torch.randn(HEAD_DIM, device="cuda")).to(torch.bfloat16)
    angles = torch.rand(1, tokens, HEAD_DIM // 2, device="cuda") * 100
    rope = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))
    args = (qkv, q_weight, k_weight, rope, HEADS, 1e-5)
    moved = 2 * 2 * tokens * DIM * 2 + rope.numel() * 4
    expected = qk_norm_rope.reference(*args).float()
    compiled = torch.compile(qk_norm_rope.reference, fullgraph=True)
    inline = torch.compile(qk_norm_rope.qk_norm_rope_inline, fullgraph=True)
    variants = {"qk eager": lambda: qk_norm_rope.reference(*args), "qk compiled": lambda: compiled(*args),
                "qk kernel inline compiled": lambda: inline(*args)}
    for warps in (4, 8, 16):
        variants[f"qk kernel {warps} warps"] = lambda w=warps: qk_norm_rope.run_kernel(*args, num_warps=w)
    rows = []
    for tag, fn in variants.items():
        try:
            got = fn().float()
            ms = _time_ms(fn)
        except Exception as exc:  # one variant failing to compile is a finding, recorded as its row
            rows.append({"kernel": tag, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"})
            continue
        rows.append({"kernel": tag, "ms": round(ms, 4), "gb_s": round(moved / ms / 1e6),
                     "bf16_equal": round((got == expected).float().mean().item(), 6),
                     "max_rel_err": float((got - expected).abs().max() / expected.abs().max())})
    return rows


def _scaled(x_fp8, scale_a, layer, fast: bool):
    import torch

    return torch._scaled_mm(x_fp8, layer.weight.t(), scale_a=scale_a, scale_b=layer.weight_scale,
                            out_dtype=torch.bfloat16, use_fast_accum=fast)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4224)
    parser.add_argument("--jsonl", default="")
    parser.add_argument("--only", choices=("attention", "matmul", "gate", "qk"), help="time one group of kernels")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels needs a CUDA GPU")
    env = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens": args.tokens,
           "date": time.strftime("%Y-%m-%d", time.gmtime())}
    from bench.profiles import emit

    groups = {"attention": attention_rows, "matmul": matmul_rows, "gate": gate_rows, "qk": qk_rows}
    for name, rows in groups.items():
        if args.only in (None, name):
            for row in rows(args.tokens):
                emit({**row, **env}, args.jsonl)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
