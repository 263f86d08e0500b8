"""LoRA backward's two products of an output gradient g as one Triton kernel: one read of g.

    gbs = s · g B        (T, r)    B  (N, r): what dx and dA need (kernels/lora.py, lora_group.py)
    dB  = gᵀ xs          (N, r)    xs (T, r): s · x Aᵀ, saved by forward

               column block j (BN wide)
              ┌────────┬────────┬────────┐
     row      │        │ g tile │        │ ──► tile · B[j]        (BT × r) ─► P[j, rows]
     chunk c  │        │ BT×BN  │        │ ──► tileᵀ · xs[rows]   (BN × r) ─► Q[c, cols] (summed
              └────────┴────────┴────────┘                                   over c's tiles)
     gbs = s · Σ_j P[j]          dB = Σ_c Q[c]                                 (fp32, then torch)

Each program reads its tiles of g once and feeds both dots: g (T·N values, 235 MB in bf16
for a Llama-3-8B MLP projection at T = 8192) is read once instead of twice by two memory-
bound torch.mm calls (r = 16 is 16 flops per byte of g). It writes the fp32 partials P
(N/BN × T × PR, PR = r padded to tl.dot's 16: 2·PR/BN of g's bytes) and Q (chunks × N × PR,
small), and torch sums them in a fixed order: deterministic, no atomics. Rows are cut into
as many chunks as keep about two programs on every SM.

On an H200 at T = 8192, r = 16 (bench/lora_grad_products.py, GPU time): 99 µs against the
two torch.mm's 122 µs at N = 14336, 38 against 44 at N = 4096, 16 against 19 at N = 1024;
of the 99, ~21 are the two torch sums. A plain call also spends ~100 µs of CPU, mostly
Triton's launch, which the GPU hides only when it has work queued.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimtune.quant.triton import launch, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _grad_products(
        g_ptr, b_ptr, xs_ptr, p_ptr, q_ptr, T, N, TC, ld_g, ld_b, ld_xs,
        R: tl.constexpr, PR: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """Column block j = program_id(0) over row chunk c = program_id(1) (TC rows, BT at a
        time): P[j, rows] = g_tile B[cols] per tile, Q[c, cols] = Σ g_tileᵀ xs[rows].
        PR: the rank padded to a power of two ≥ 16 (tl.dot). UPCAST: dots in fp32, for the
        CPU interpreter, whose tl.dot multiplies bf16's stored bits as integers (Triton 3.9)."""
        j, c = tl.program_id(0), tl.program_id(1)
        cols = j * BN + tl.arange(0, BN)
        k = tl.arange(0, PR)
        cmask, kmask = cols < N, k < R
        b = tl.load(b_ptr + cols[:, None] * ld_b + k[None, :],
                    mask=cmask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
        if UPCAST:
            b = b.to(tl.float32)
        acc = tl.full((BN, PR), 0.0, tl.float32)
        for start in range(0, TC, BT):
            rows = c.to(tl.int64) * TC + start + tl.arange(0, BT)
            rmask = rows < T
            g = tl.load(g_ptr + rows[:, None] * ld_g + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0)  # fmt: skip
            xs = tl.load(xs_ptr + rows[:, None] * ld_xs + k[None, :],
                         mask=rmask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
            if UPCAST:
                g, xs = g.to(tl.float32), xs.to(tl.float32)
            part = tl.dot(g, b, input_precision=PRECISION)  # (BT, PR)
            tl.store(p_ptr + (j.to(tl.int64) * T + rows)[:, None] * PR + k[None, :], part,
                     mask=rmask[:, None])  # fmt: skip
            acc += tl.dot(tl.trans(g), xs, input_precision=PRECISION)  # (BN, PR)
        tl.store(q_ptr + (c.to(tl.int64) * N + cols)[:, None] * PR + k[None, :], acc,
                 mask=cmask[:, None])  # fmt: skip


# the tiles `grad_products` runs with unless given: the fastest of bench/lora_grad_products.py's
# sweep on an H200 at N = 14336 and 4096 (bench/NOTES.md run 29); `tiles` may also name
# "chunks", the row chunks, instead of about two programs per SM
TILES = {"BT": 32, "BN": 256, "num_warps": 4}
_INTERPRETER_SMS = 2  # the CPU interpreter: few programs, each a Python loop


def _chunks(g: Tensor, blocks: int, tiles_t: int) -> int:
    """Row chunks for about two programs per SM (at most one chunk per row tile)."""
    sms = _INTERPRETER_SMS
    if g.device.type == "cuda":
        sms = torch.cuda.get_device_properties(g.device).multi_processor_count
    return max(1, min(tiles_t, triton.cdiv(2 * sms, blocks)))


def grad_products(
    g: Tensor,
    b: Tensor,
    xs: Tensor,
    scale: float = 1.0,
    out_gb: Tensor | None = None,
    tiles: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """(scale · g b, gᵀ xs) with one read of g, accumulated in float32.

    Args:
        g: (T, N) output gradient, rows contiguous (a row stride larger than N is read too).
        b: (N, r) LoRA B, in g's dtype.
        xs: (T, r) the saved s · x Aᵀ, in g's dtype; may be a column slice of a wider buffer.
        scale: multiplies g b (LoRA's scaling).
        out_gb: optional (T, r) destination of scale · g b, which may have a row stride larger
            than r (a column slice of a (T, n·r) buffer).
        tiles: {"BT", "BN", "num_warps"} and optionally "chunks" (`TILES` unless given).

    Returns:
        gbs (T, r) in g's dtype (out_gb when given) and dB (N, r) in float32.
    """
    if triton is None:
        raise RuntimeError("grad_products needs triton")
    tiles = dict(tiles or TILES)
    bt, bn = tiles["BT"], tiles["BN"]
    (t, n), r = g.shape, b.shape[1]
    b, xs = (u if u.stride(1) == 1 else u.contiguous() for u in (b, xs))
    pr = max(16, triton.next_power_of_2(r))
    blocks = triton.cdiv(n, bn)
    chunks = tiles.pop("chunks", None) or _chunks(g, blocks, triton.cdiv(t, bt))
    tc = triton.cdiv(triton.cdiv(t, bt), chunks) * bt  # rows per chunk, a multiple of BT
    chunks = triton.cdiv(t, tc)
    p = g.new_empty(blocks, t, pr, dtype=torch.float32)  # gb's partial per column block
    q = g.new_empty(chunks, n, pr, dtype=torch.float32)  # dB's partial per row chunk
    precision = "ieee" if g.dtype == torch.float32 else "tf32"  # tf32: unused on 16-bit inputs
    launch(_grad_products, g, (blocks, chunks), g, b, xs, p, q, t, n, tc, g.stride(0),
           b.stride(0), xs.stride(0), R=r, PR=pr, PRECISION=precision,
           UPCAST=g.device.type == "cpu", **tiles)  # fmt: skip
    gbs = p[:, :, :r].sum(0)  # (T, r) fp32
    gbs = gbs if scale == 1 else gbs.mul_(scale)
    db = q[:, :, :r].sum(0)  # (N, r) fp32
    if out_gb is None:
        return gbs.to(g.dtype), db
    return out_gb.copy_(gbs), db


def gradient_products(
    g: Tensor, b: Tensor, xs: Tensor, scale: float, out_gb: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(scale · g b in g's dtype, gᵀ xs in float32): one read of g on CUDA (`grad_products`),
    two torch.mm elsewhere (the CPU's fused path, forced in tests)."""
    if g.is_cuda and triton is not None:
        return grad_products(g if g.stride(1) == 1 else g.contiguous(), b, xs, scale, out_gb)
    gbs = torch.mm(g, b)
    gbs = gbs if scale == 1 else gbs.mul_(scale)
    if out_gb is not None:
        gbs = out_gb.copy_(gbs)
    return gbs, torch.mm(g.t(), xs).float()
