"""LoftQ: LoRA-fine-tuning-aware quantization, Li et al. 2023, arXiv:2310.08659.

QLoRA starts from Q = q(W) with B = 0, so step 0 already carries the whole quantization
error W − Q. LoftQ instead picks Q and the LoRA factors together so that

    Q + s · B A ≈ W           (s = the adapter's scaling, alpha / r)

by alternating a quantization and a rank-r SVD of what is left (the paper's Algorithm 1):

    R_0 = 0
    for t = 1 … T:
        Q_t = dequantize(quantize(W − R_{t−1}))          the base stores q(W − low-rank part)
        U Σ Vᵀ = svd(W − Q_t)                            the quantization error, best rank r
        R_t = U_r Σ_r V_rᵀ = s · B A,   B = U_r √Σ_r / √s,   A = √Σ_r V_rᵀ / √s

At T = 1 and B = A = 0 before, this is "quantize, then put the error's top r singular
directions into the adapter". ‖W − Q − sBA‖ never exceeds ‖W − Q‖ (the SVD can only help).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from slimtune.quant import QuantState, quantize


def low_rank(residual: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor]:
    """(A (r, in), B (out, r)) with scaling · B A the best rank-r approximation of `residual`.

    The top-r singular pairs come from the eigendecomposition of the smaller Gram matrix
    in float64 (R Rᵀ = U Σ² Uᵀ), several times faster than a full SVD on a CPU.
    """
    m = residual.double()  # (out, in)
    tall = m.shape[0] > m.shape[1]
    gram = m.T @ m if tall else m @ m.T  # (k, k), k = min(out, in)
    values, vectors = torch.linalg.eigh(gram)  # ascending
    r = min(r, values.numel())
    top = vectors[:, -r:].flip(-1)  # (k, r): leading singular vectors of the small side
    sigma = values[-r:].flip(-1).clamp(min=0).sqrt()  # (r,)
    other = (m @ top if tall else m.T @ top) / sigma.clamp(min=1e-30)  # (big, r)
    u, v = (other, top) if tall else (top, other)  # u (out, r), v (in, r)
    root = (sigma / scaling).sqrt()  # (r,)
    return (root[:, None] * v.T).float(), (u * root[None, :]).float()


def loftq_decompose(
    weight: Tensor,
    r: int,
    *,
    scaling: float = 1.0,
    quant: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    iters: int = 1,
) -> tuple[QuantState, Tensor, Tensor]:
    """LoftQ on one weight (out, in): (quantized base state, A (r, in), B (out, r)), fp32 A/B.

    Args:
        weight: the full-precision W (out, in).
        r: the LoRA rank.
        scaling: the adapter's scaling (alpha / r): A and B are divided by √scaling.
        quant, blocksize, double_quant: how the base will be quantized.
        iters: alternating steps T (the paper uses 1 … 5).
    """
    w = weight.detach().float()
    lora_a = torch.zeros(r, w.shape[1])
    lora_b = torch.zeros(w.shape[0], r)
    state = None
    for _ in range(max(1, iters)):
        target = w - scaling * (lora_b @ lora_a)  # (out, in)
        state = quantize(target.to(weight.dtype), quant, blocksize, double_quant)
        lora_a, lora_b = low_rank(w - state.dequantize(torch.float32), r, scaling)
    return state, lora_a, lora_b


def loftq_init(weight: Tensor, r: int, **options: Any) -> tuple[Tensor, Tensor, Tensor]:
    """LoftQ initialisation in PEFT's order: (dequantized base Q, A, B).

    Takes loftq_decompose's arguments (scaling, quant, blocksize, double_quant, iters).
    Q (in `weight`'s dtype) replaces the base weight; quantizing it again with the same
    settings gives back the same codes (double quantization may move an absmax by 1 ulp).
    """
    state, lora_a, lora_b = loftq_decompose(weight, r, **options)
    return state.dequantize(weight.dtype), lora_a, lora_b
