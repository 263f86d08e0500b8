"""bf16 GEMM rates of one decoder layer's projections, separate and concatenated.

Times torch.mm on the shapes a Llama-3-8B layer runs for a 4 x 2048 batch (T = 8192):
forward x Wᵀ and backward g W for q, k, v, o, gate, up, down, each alone and with q/k/v
and gate/up as one concatenated weight, plus the rank-r GEMMs of LoRA. Prints ms and
TFLOP/s per shape and the per-layer totals of both layouts.

    python bench/gemm_shapes.py [--tokens 8192] [--hidden 4096] [--inter 14336] [--kv 1024]
"""

from __future__ import annotations

import argparse

import torch


def timed(fn, reps: int = 30) -> float:
    """Milliseconds per call (CUDA events, after warm-up)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--kv", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    t, d, f, kv, r = args.tokens, args.hidden, args.inter, args.kv, args.rank
    bf = dict(device="cuda", dtype=torch.bfloat16)
    rows = {}

    def gemm(name: str, m: int, k: int, n: int, transposed_b: bool, beta: bool = False):
        a = torch.randn(m, k, **bf)
        b = torch.randn(n, k, **bf) if transposed_b else torch.randn(k, n, **bf)
        bt = b.t() if transposed_b else b
        out = torch.randn(m, n, **bf)
        ms = timed((lambda: out.addmm_(a, bt)) if beta else (lambda: torch.mm(a, bt)))
        rows[name] = ms
        print(f"| {name} | {m}x{k}x{n} | {ms:.3f} | {2 * m * k * n / ms / 1e9:.0f} |")

    print("| GEMM | MxKxN | ms | TFLOP/s |\n|---|---|---|---|")
    for name, n in (
        ("q/o", d),
        ("k/v", kv),
        ("qkv", d + 2 * kv),
        ("gate/up", f),
        ("gate+up", 2 * f),
    ):
        gemm(f"fwd {name}", t, d, n, True)
        gemm(f"fwd {name} beta=1", t, d, n, True, beta=True)
        gemm(f"bwd {name}", t, n, d, False)
        gemm(f"bwd {name} beta=1", t, n, d, False, beta=True)
    gemm("fwd down", t, f, d, True)
    gemm("bwd down", t, d, f, False)
    gemm("lora x A^T (r)", t, d, r, True)
    gemm("lora x A^T (3r)", t, d, 3 * r, True)
    gemm("lora xs B^T (inter)", t, r, f, True)
    gemm("lora g^T xs (inter)", f, t, r, False)
    sep = 2 * rows["fwd q/o beta=1"] + 2 * rows["fwd k/v beta=1"] + 2 * rows["fwd gate/up beta=1"]
    sep += 2 * rows["bwd q/o beta=1"] + 2 * rows["bwd k/v beta=1"] + 2 * rows["bwd gate/up beta=1"]
    cat = rows["fwd qkv beta=1"] + rows["fwd q/o beta=1"] + rows["fwd gate+up beta=1"]
    cat += rows["bwd qkv beta=1"] + rows["bwd q/o beta=1"] + rows["bwd gate+up beta=1"]
    # sep counts o twice (q/o): both layouts hold o once and q once
    print(f"\nper layer (q,k,v,o,gate,up; fwd + bwd dx): separate {sep:.3f} ms, "
          f"q/k/v and gate/up concatenated {cat:.3f} ms ({sep / cat - 1:+.1%})")  # fmt: skip


if __name__ == "__main__":
    main()
