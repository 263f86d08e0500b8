"""Tile sweep of kernels/lora_grad.py's fused LoRA gradient products on a Llama-3-8B layer's
projections (T = 8192; N = 4096 q/o, 1024 k/v, 14336 gate/up; r = 16): microseconds and
effective GB/s (g, B and xs read once, gb and dB written once) of torch's two skinny GEMMs
g B and gᵀ xs, of `grad_products` with `lora_grad.TILES`, and of the best few (BT, BN, warps)
of the sweep; with the largest difference of each from float32 torch. Times are the GPU's
alone (calls replayed from a CUDA graph: one Triton launch costs ~100 µs of Python, more
than the kernel), and "eager" is a plain call's. The fastest over the three N becomes
`lora_grad.TILES`. CUDA only.

    python bench/lora_grad_products.py [--tokens 8192] [--rank 16] [--top 3]
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from gemm_shapes import timed
from slimtune.kernels.lora_grad import TILES, grad_products


def gpu_timed(fn, calls: int = 10) -> float:
    """Milliseconds per call on the GPU: `calls` calls captured in a CUDA graph, replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles, cuBLAS handles: outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return timed(graph.replay) / calls


def _row(n: int, run: str, tiles: dict | None, fn, size: int, err: str = "") -> float:
    """Prints one table row (the eager time only when `err` is: the reference rows)."""
    bt, bn, warps = (tiles["BT"], tiles["BN"], tiles["num_warps"]) if tiles else ("", "", "")
    ms = gpu_timed(fn)
    eager = f"{timed(fn) * 1e3:.1f}" if err else ""
    print(f"| {n} | {run} | {bt} | {bn} | {warps} | {ms * 1e3:.1f} | {size / ms / 1e6:.0f} "
          f"| {eager} | {err} |")  # fmt: skip
    return ms


def _errors(gb: torch.Tensor, db: torch.Tensor, want_gb, want_db) -> str:
    """Largest absolute difference of gb and dB from float32 torch."""
    e_gb, e_db = (gb.float() - want_gb).abs().max(), (db.float() - want_db).abs().max()
    return f"gb {e_gb:.2e}, dB {e_db:.2e}"


def bench_n(t: int, n: int, r: int, top: int) -> None:
    bf = dict(device="cuda", dtype=torch.bfloat16)
    g, b, xs = torch.randn(t, n, **bf), torch.randn(n, r, **bf) * 0.1, torch.randn(t, r, **bf)
    size = 2 * t * n + 2 * n * r + 2 * t * r + 2 * t * r + 4 * n * r  # bytes, g read once
    want_gb, want_db = torch.mm(g.float(), b.float()), torch.mm(g.float().t(), xs.float())

    def reference():
        return torch.mm(g, b), torch.mm(g.t(), xs).float()

    _row(n, "torch.mm ×2", None, reference, size, _errors(*reference(), want_gb, want_db))
    fused = _errors(*grad_products(g, b, xs), want_gb, want_db)
    _row(n, "fused, TILES", TILES, lambda: grad_products(g, b, xs), size, fused)
    results = []
    for bt, bn, warps in itertools.product((32, 64, 128), (64, 128, 256), (4, 8)):
        tiles = {"BT": bt, "BN": bn, "num_warps": warps}
        try:
            results.append((gpu_timed(lambda c=tiles: grad_products(g, b, xs, tiles=c)), tiles))
        except Exception as e:  # a configuration the compiler refuses (shared memory)
            print(f"| {n} | failed: {str(e)[:60]} | {bt} | {bn} | {warps} | | | | |")
    for _, tiles in sorted(results, key=lambda x: x[0])[:top]:
        _row(n, "fused, sweep", tiles, lambda c=tiles: grad_products(g, b, xs, tiles=c), size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--top", type=int, default=3, help="sweep configurations printed per N")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/lora_grad_products.py needs a CUDA GPU: none is visible")
    print(f"T = {args.tokens}, r = {args.rank}; GB/s counts g once (the fused kernel's reads)")
    print("| N | run | BT | BN | warps | us | GB/s | us eager | max abs error vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in (4096, 1024, 14336):
        bench_n(args.tokens, n, args.rank, args.top)


if __name__ == "__main__":
    main()
