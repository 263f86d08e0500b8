"""Vector-wise int8 weight quantization with 16-bit outlier columns (LLM.int8()).

LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale, Dettmers et al. 2022,
arXiv:2208.07339. Each output row i of W (out × in) keeps its absmax s_i and int8 codes:

    C_ij = round(127 · W_ij / s_i),          Ŵ_ij = C_ij · s_i / 127

Outliers: entries with |W_ij| >= threshold are left out of s_i, and every input column j
holding one is stored unquantized in 16 bits (its int8 codes are zero). This is exactly
bitsandbytes' `int8_vectorwise_quant(W, threshold)` plus the kept columns.

Layout: codes int8 (out, in), row absmax fp32 (out,), outlier column indices int64 (k,),
outlier values 16-bit (out, k): fp16, or bf16 for a bf16 weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slimtune.errors import SlimtuneError

INV_127 = 7.874015718698502e-3  # 1 / 127 as bitsandbytes writes it


def quantize_rows(w: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """(codes int8 (out, in), row absmax fp32 (out,), outlier columns int64 (k,))."""
    outliers = w.abs() >= threshold if threshold > 0 else torch.zeros_like(w, dtype=torch.bool)
    columns = torch.argwhere(outliers.any(dim=0)).view(-1)
    inliers = w.masked_fill(outliers, 0)
    absmax = inliers.abs().amax(dim=1).float()  # (out,)
    scaled = torch.round(inliers * (127.0 / absmax.unsqueeze(-1)))  # NaN on an all-zero row
    codes = scaled.nan_to_num(0.0).to(torch.int8)
    if w.shape[0] > 1:
        codes[:, columns] = 0
    return codes, absmax, columns


def dequantize_rows(codes: Tensor, absmax: Tensor) -> Tensor:
    """Ŵ = C · s / 127 in fp32, as bitsandbytes' `int8_vectorwise_dequant`."""
    return codes * absmax.view(-1, 1) * INV_127


@dataclass(frozen=True)
class QuantStateInt8:
    """An int8 row-wise quantized weight with its outlier columns kept in 16 bits."""

    codes: Tensor  # int8 (out, in)
    absmax: Tensor  # fp32 (out,): absmax of each row, outliers left out
    outlier_columns: Tensor  # int64 (k,): input columns kept in 16 bits
    outliers: Tensor  # fp16/bf16 (out, k): their values
    shape: torch.Size
    dtype: torch.dtype
    threshold: float

    quant_type = "int8"

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        w = dequantize_rows(self.codes, self.absmax)  # (out, in) fp32
        if self.outlier_columns.numel():
            w[:, self.outlier_columns] = self.outliers.float()
        return w.to(dtype or self.dtype)

    @property
    def nbytes(self) -> int:
        """Every stored byte: codes, row absmax, outlier column indices and values."""
        parts = [self.codes, self.absmax, self.outlier_columns, self.outliers]
        return sum(p.numel() * p.element_size() for p in parts)


def quantize_int8(w: Tensor, threshold: float = 6.0) -> QuantStateInt8:
    """Quantize a 2-D weight (out, in) row-wise to int8 (see the module docstring)."""
    if w.dim() != 2:
        raise SlimtuneError(
            f"int8 quantization needs a 2-D weight (out, in), got shape {tuple(w.shape)}"
        )
    codes, absmax, columns = quantize_rows(w, threshold)
    keep = torch.bfloat16 if w.dtype == torch.bfloat16 else torch.float16
    outliers = w[:, columns].to(keep)
    return QuantStateInt8(codes, absmax, columns, outliers, w.shape, w.dtype, threshold)
