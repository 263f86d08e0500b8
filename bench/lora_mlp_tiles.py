"""Tile sweep of kernels/lora_mlp.py's gated kernel on a Llama-3-8B MLP (T = 8192, I = 14336,
r = 16): microseconds and GB/s of the forward (reads x Wᵀ twice, writes h) and backward (reads
dh and x Wᵀ twice, writes da and db) per configuration, against a device copy and the plain
SwiGLU kernels of kernels/llama_ops.py. The fastest forward and backward configurations become `lora_mlp.TILES`.

    python bench/lora_mlp_tiles.py [--tokens 8192] [--inter 14336] [--rank 16]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from gemm_shapes import timed
from slimtune.kernels import lora_mlp
from slimtune.kernels.llama_ops import silu_mul


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    t, n, r = args.tokens, args.inter, args.rank
    bf = dict(device="cuda", dtype=torch.bfloat16)
    yg, yu, dh = (torch.randn(t, n, **bf) for _ in range(3))
    xs = torch.randn(t, 2 * r, **bf)
    bg, bu = torch.randn(n, r, **bf) * 0.1, torch.randn(n, r, **bf) * 0.1
    size = t * n * 2
    copy = timed(lambda: dh.copy_(yg)) * 1e3
    print(f"copy: {copy:.0f} us, {2 * size / copy / 1e3:.0f} GB/s")
    fwd = timed(lambda: silu_mul(yg, yu)) * 1e3
    print(f"plain SwiGLU fwd {fwd:.0f} us ({3 * size / fwd / 1e3:.0f} GB/s)")
    print("| BT | BN | warps | fwd us | fwd GB/s | bwd us | bwd GB/s |")
    print("|---|---|---|---|---|---|---|")
    for bt, bn, warps in itertools.product((16, 32, 64, 128), (64, 128, 256), (2, 4, 8)):
        tiles = {"BT": bt, "BN": bn, "num_warps": warps}
        try:
            f = timed(lambda c=tiles: lora_mlp._tiles(yg, yu, xs, bg, bu, False, tiles=c)) * 1e3
            b = (
                timed(lambda c=tiles: lora_mlp._tiles(yg, yu, xs, bg, bu, False, dh=dh, tiles=c))
                * 1e3
            )
        except Exception as e:  # a configuration the compiler refuses (shared memory)
            print(f"| {bt} | {bn} | {warps} | failed: {str(e)[:60]} |")
            continue
        print(f"| {bt} | {bn} | {warps} | {f:.0f} | {3 * size / f / 1e3:.0f} | {b:.0f} | "
              f"{5 * size / b / 1e3:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
