"""4-bit NormalFloat (NF4) and FP4 blockwise quantization with double quantization.

QLoRA: Efficient Finetuning of Quantized LLMs, Dettmers et al. 2023, arXiv:2305.14314.
A weight is cut into blocks of `blocksize` consecutive values (row-major, over the
flattened tensor). Each block keeps its absolute maximum, and each value the index of the
nearest of 16 levels q_j in [-1, 1]:

    c_i = argmin_j |q_j - w_i / absmax_b|,          ŵ_i = q_{c_i} · absmax_b

NF4's levels are quantiles of N(0, 1) (equal probability mass per level, exact zero);
FP4's are a 1-sign/2-exponent/1-mantissa float. Double quantization stores the fp32
absmax values themselves as 8-bit codes (see blockwise.py), in blocks of 256 around
their mean:

    absmax_b ≈ dynamic[a_b] · absmax2_{b // 256} + offset

Storage: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per parameter at blocksize 64.

Layout (identical to bitsandbytes 0.50.2, so GPU kernels and bnb checkpoints read it):

    codes    uint8, flat (ceil(n / 2),)      byte k = (c_{2k} << 4) | c_{2k+1}: the first
                                             value in the high nibble; an odd n pads one 0
    absmax   fp32 (ceil(n / blocksize),)     block b covers flat values [b·bs, (b+1)·bs);
                                             the last block may be short
      or, with double quantization:
    absmax   uint8 (ceil(n / blocksize),)    8-bit codes of (absmax_b - offset)
    absmax2  fp32 (ceil(nblocks / 256),)     absmax of each group of 256 codes
    offset   fp32 scalar                     mean of the fp32 absmax values
    code     fp32 (16,)                      the levels (NF4 sorted; FP4 in bit order)
    code2    fp32 (256,)                     the dynamic map (`blockwise.dynamic_map()`)

Everything is flat along the parameter order, so sharding (FSDP2) cuts codes and
statistics at block boundaries with plain slicing. `dequantize_4bit` is the pure-torch
reference that fast kernels (quant/triton.py) are tested against.

bitsandbytes quirks kept for byte identity: a short last block's absmax is clamped to
1e-38 (full blocks keep 0.0); the last block divides by its absmax where full blocks
multiply by its reciprocal; a value exactly between two levels takes the lower one.
FP4 code 0b1000 decodes to +0.0 here, as in bitsandbytes' saved `quant_map`, its torch
reference and its AVX-512 kernel (its scalar C++ and CUDA kernels give -0.0, an equal value).
Dequantization multiplies level · absmax in fp32 and rounds once to the target dtype, as
bitsandbytes' kernels do. (Its 0.50.2 AVX-512 CPU dequantizer reads absmax per row, which
is wrong when a row is not a whole number of blocks; its torch and scalar paths agree here.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from slimtune.quant.blockwise import dequantize_blockwise, dynamic_map, quantize_blockwise

NESTED_BLOCKSIZE = 256  # absmax values per second-level block (double quantization)

NF4_LEVELS = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
# FP4 (e2m1, bias 2) in bit-pattern order: code c has sign c >> 3, magnitude from c & 7
FP4_LEVELS = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]  # fmt: skip


@cache
def codebook(quant_type: str) -> Tensor:
    """The 16 fp32 levels of "nf4" or "fp4", normalised to [-1, 1] as bitsandbytes does."""
    data = torch.tensor(NF4_LEVELS if quant_type == "nf4" else FP4_LEVELS)
    return data / data.abs().max()


@cache
def _bounds(quant_type: str) -> tuple[Tensor, Tensor]:
    """Midpoints between sorted levels, and sorted position -> code (identity for NF4)."""
    code = codebook(quant_type)
    order = torch.argsort(code)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


def blockwise_absmax(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Per-block absmax (fp32) and the values scaled into [-1, 1] (flat fp32 in)."""
    n = flat.numel()
    full = n - n % blocksize
    grid = flat[:full].view(-1, blocksize)  # (full blocks, blocksize)
    absmax = grid.abs().amax(dim=1)
    scaled = (grid * (1.0 / absmax.clamp(min=1e-38).view(-1, 1))).clamp_(-1, 1).reshape(-1)
    if full < n:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    return absmax, scaled


def quantize_4bit(w: Tensor, quant_type: str = "nf4", blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """Quantize `w` to packed 4-bit codes and per-block fp32 absmax.

    Returns:
        (codes uint8 (ceil(n / 2),), absmax fp32 (ceil(n / blocksize),)).
    """
    bounds, order = _bounds(quant_type)
    absmax, scaled = blockwise_absmax(w.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    index = torch.bucketize(scaled, bounds.to(scaled.device), out_int32=True)  # (2k,)
    if quant_type != "nf4":  # NF4's levels are sorted: position = code
        index = order.to(device=scaled.device, dtype=torch.int32)[index]
    return ((index[0::2] << 4) | index[1::2]).to(torch.uint8), absmax


def unpack_4bit(codes: Tensor, n: int) -> Tensor:
    """Packed bytes -> n code indices (int64), high nibble first."""
    pairs = torch.stack([codes >> 4, codes & 0xF], dim=-1)  # (ceil(n/2), 2)
    return pairs.reshape(-1)[:n].long()


def dequantize_4bit(
    codes: Tensor,
    absmax: Tensor,
    quant_type: str,
    blocksize: int,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
) -> Tensor:
    """Reference dequantization: ŵ_i = level[c_i] · absmax_b in fp32, then cast to `dtype`.

    Args:
        codes: packed uint8 codes, (ceil(n / 2),) or any shape holding them in order.
        absmax: fp32 per-block absmax (already double-dequantized), (ceil(n / blocksize),).
        quant_type: "nf4" or "fp4".
        blocksize: values per block.
        shape: shape of the weight.
        dtype: dtype of the result (the product is rounded once, from fp32).
    """
    n = torch.Size(shape).numel()
    levels = codebook(quant_type).to(codes.device)[unpack_4bit(codes.reshape(-1), n)]  # (n,)
    scale = absmax.float().repeat_interleave(blocksize)[:n]  # (n,)
    return (levels * scale).view(shape).to(dtype)


def dequantize_nf4(
    codes: Tensor, absmax: Tensor, blocksize: int, shape, dtype: torch.dtype
) -> Tensor:
    """`dequantize_4bit` for NF4: the reference the Triton kernel is compared against."""
    return dequantize_4bit(codes, absmax, "nf4", blocksize, shape, dtype)


def double_quantize(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 absmax -> (uint8 codes, fp32 absmax2 per 256, fp32 offset), as bitsandbytes."""
    offset = absmax.mean()
    qabsmax, absmax2 = quantize_blockwise(absmax - offset, dynamic_map(), NESTED_BLOCKSIZE)
    return qabsmax, absmax2, offset


def double_dequantize(qabsmax: Tensor, absmax2: Tensor, offset: Tensor) -> Tensor:
    """uint8 absmax codes -> fp32 absmax: dynamic[a_b] · absmax2 + offset."""
    code = dynamic_map().to(qabsmax.device)
    return dequantize_blockwise(qabsmax, absmax2, code, NESTED_BLOCKSIZE) + offset


@dataclass(frozen=True)
class QuantState4bit:
    """A 4-bit quantized tensor: packed codes plus the statistics that undo them."""

    quant_type: str  # "nf4" or "fp4"
    codes: Tensor  # uint8 (ceil(n / 2),): two codes per byte, first in the high nibble
    absmax: Tensor  # fp32 (nblocks,), or uint8 (nblocks,) with double quantization
    shape: torch.Size  # shape of the original weight
    dtype: torch.dtype  # dtype of the original weight
    blocksize: int  # values per absmax
    absmax2: Tensor | None = None  # fp32 (ceil(nblocks / 256),) with double quantization
    offset: Tensor | None = None  # fp32 scalar with double quantization

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def code(self) -> Tensor:
        return codebook(self.quant_type)

    def fp32_absmax(self) -> Tensor:
        """The per-block absmax in fp32 (undoing double quantization if used)."""
        if self.absmax2 is None:
            return self.absmax
        return double_dequantize(self.absmax, self.absmax2, self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight ŵ in `dtype` (default: the original dtype), bit-identical to bitsandbytes."""
        absmax = self.fp32_absmax()
        return dequantize_4bit(
            self.codes, absmax, self.quant_type, self.blocksize, self.shape, dtype or self.dtype
        )

    @property
    def nbytes(self) -> int:
        """Every stored byte of this tensor: codes, absmax, absmax2 and offset.

        The two codebooks (16 and 256 fp32 values) are constants of the format, shared by
        every tensor, so they are not counted (bitsandbytes' checkpoints repeat them).
        """
        parts = [self.codes, self.absmax, self.absmax2, self.offset]
        return sum(p.numel() * p.element_size() for p in parts if p is not None)


def quantize_4bit_state(
    w: Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> QuantState4bit:
    """Quantize `w` into a QuantState4bit (arguments already validated)."""
    codes, absmax = quantize_4bit(w, quant_type, blocksize)
    absmax2 = offset = None
    if double_quant:
        absmax, absmax2, offset = double_quantize(absmax)
    return QuantState4bit(quant_type, codes, absmax, w.shape, w.dtype, blocksize, absmax2, offset)
