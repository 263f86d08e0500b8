"""Kernel micro-benchmarks on one GPU: NF4 dequantization and the fused LoRA linear.

    python bench/gpu_kernels.py

Prints the two ceilings (device-to-device copy bandwidth, bf16 matmul rate), then
  - NF4 + double-quant dequantization of Llama-3-8B weights (14336x4096 and 4096x4096):
    slimtune's Triton kernel, bitsandbytes' CUDA kernel and the torch reference, in TB/s
    counting the bytes that must move (packed codes + statistics read, bf16 written);
  - one LoRA projection forward + backward at 8192 tokens (4096 -> 14336, r=16), PEFT-style
    (base, then lora_B(lora_A(x)) * s, adapters fp32 under autocast) against fast.lora_linear,
    for a bf16 and an NF4 base.
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

from slimtune.kernels import lora as fast
from slimtune.quant.nf4 import quantize_4bit_state
from slimtune.quant.triton import dequantize_nf4_triton, dequantize_state_triton


def copy_tbs() -> float:
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms / 1e3) / 1e12


def matmul_tflops() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * 8192**3 / (ms / 1e3) / 1e12


def dequant_rows(shape: tuple[int, int]) -> list[tuple[str, float, float]]:
    import bitsandbytes.functional as bnbf

    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
    state = quantize_4bit_state(w, "nf4", 64, double_quant=True)
    q, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    n = w.numel()
    moved = n // 2 + state.absmax.numel() + state.absmax2.numel() * 4 + n * 2  # bytes
    ours = dequantize_state_triton(state, torch.bfloat16)
    assert torch.equal(ours, state.dequantize(torch.bfloat16))
    on_bnb = dequantize_nf4_triton(
        q, qs.absmax, qs.code, shape, torch.bfloat16, 64,
        absmax2=qs.state2.absmax, code2=qs.state2.code, offset=qs.offset,
    )  # fmt: skip
    assert torch.equal(on_bnb, bnbf.dequantize_4bit(q, qs))  # bnb's codes: bnb's bits
    out = torch.empty_like(w)
    rows = []
    for name, fn in [
        ("slimtune triton", lambda: dequantize_state_triton(state, torch.bfloat16)),
        ("bitsandbytes", lambda: bnbf.dequantize_4bit(q, qs, out=out)),
        ("torch reference", lambda: state.dequantize(torch.bfloat16)),
    ]:
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        rows.append((f"dequant {shape[0]}x{shape[1]} {name}", ms * 1e3, moved / (ms / 1e3) / 1e12))
    return rows


def dequant_sweep(shape: tuple[int, int] = (14336, 4096)) -> list[tuple[str, float, float]]:
    """Launch shapes of the Triton kernel: tiled or flat, bytes per program, warps."""
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
    state = quantize_4bit_state(w, "nf4", 64, double_quant=True)
    n = w.numel()
    moved = n // 2 + state.absmax.numel() + state.absmax2.numel() * 4 + n * 2
    rows = []
    configs = [
        dict(tiled=False, bytes_per_program=s, num_warps=w) for s in (1024, 2048) for w in (4, 8)
    ]
    configs += [
        dict(tiled=True, bytes_per_program=s, num_warps=w, evict=e)
        for s in (512, 1024, 2048, 4096) for w in (2, 4, 8) for e in ("", "evict_first")
    ]  # fmt: skip
    for cfg in configs:
        fn = lambda cfg=cfg: dequantize_state_triton(state, torch.bfloat16, **cfg)  # noqa: E731
        ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
        rows.append((f"sweep {cfg}", ms * 1e3, moved / (ms / 1e3) / 1e12))
    return sorted(rows, key=lambda r: r[1])[:6]


def lora_rows(tokens: int = 8192, d_in: int = 4096, d_out: int = 14336, r: int = 16):
    import bitsandbytes as bnb

    x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) * 0.02
    a = (torch.randn(r, d_in, device="cuda") * 0.01).requires_grad_(True)
    b = (torch.randn(d_out, r, device="cuda") * 0.01).requires_grad_(True)
    g = torch.randn(tokens, d_out, device="cuda", dtype=torch.bfloat16)
    state = quantize_4bit_state(w, "nf4", 64, double_quant=True)
    q, qs = bnb.functional.quantize_4bit(
        w, blocksize=64, quant_type="nf4", compress_statistics=True
    )

    def peft_like(base):
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = base(x) + (x @ a.t() @ b.t()) * 1.0
            y.backward(g)

        return run

    def fused(weight):
        return lambda: fast.lora_linear(x, weight, None, a, b, 1.0).backward(g)

    flops = 2 * 2 * tokens * d_in * d_out  # the frozen base: forward and input gradient
    rows = []
    for name, fn in [
        ("lora bf16 PEFT-style", peft_like(lambda t: t @ w.t())),
        ("lora bf16 fused", fused(w)),
        ("qlora bnb PEFT-style", peft_like(lambda t: bnb.matmul_4bit(t, q.t(), qs))),
        ("qlora nf4 fused", fused(state)),
    ]:
        ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
        rows.append((f"{name} fwd+bwd {tokens}x{d_in}->{d_out}", ms * 1e3, flops / ms / 1e9))
    return rows


def main() -> None:
    print(f"copy {copy_tbs():.2f} TB/s (read + write), bf16 matmul {matmul_tflops():.0f} TFLOP/s")
    print("| kernel | us | TB/s, or TFLOP/s counting the base's 2 matmuls |")
    print("|---|---|---|")
    for shape in [(14336, 4096), (4096, 4096)]:
        for name, us, rate in dequant_rows(shape):
            print(f"| {name} | {us:.1f} | {rate:.2f} TB/s |")
    for name, us, rate in dequant_sweep():
        print(f"| {name} | {us:.1f} | {rate:.2f} TB/s |")
    for name, us, rate in lora_rows():
        print(f"| {name} | {us:.1f} | {rate:.0f} TFLOP/s |")


if __name__ == "__main__":
    main()
