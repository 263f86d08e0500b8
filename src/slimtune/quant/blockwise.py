"""8-bit blockwise quantization with the dynamic data type (used for double quantization).

Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861;
the dynamic type is from Dettmers 2016, "8-Bit Approximations for Parallelism in Deep
Learning", arXiv:1511.04561. QLoRA (arXiv:2305.14314) uses it to store the fp32 absmax
of every 4-bit block as one byte ("double quantization").

For each block b of 256 values x_i:

    absmax_b = max_i |x_i|,     q_i = nearest(code, x_i / absmax_b),     x̂_i = code[q_i] · absmax_b

`code` is the signed 8-bit dynamic map: 256 sorted values in [-1, 1] made of a sign, a
run of zero bits that sets a decimal exponent 10^-k (k = 0..6) and a linear fraction.

This file reproduces bitsandbytes 0.50.2's CPU kernel byte for byte. That kernel does not
search the codebook per value: it maps the scaled value to one of 65,536 evenly spaced
bins on [-1, 1] and reads the code of each bin from a table built from the midpoints of
the codebook, so values that fall in a bin straddling a midpoint round the way the bin's
centre does. `quantize_blockwise` builds the same table with the same fp32 arithmetic.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

LUT_SIZE = 65536  # bins of the CPU kernel's lookup table on [-1, 1]


@cache
def dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): 256 sorted fp32 values."""
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _lut_key(code: Tensor) -> tuple[float, ...]:
    return tuple(code.tolist())


@cache
def _lookup_table(key: tuple[float, ...]) -> Tensor:
    """Bin -> code index, exactly as bitsandbytes' `build_quantize_lut` (all fp32)."""
    code = torch.tensor(key, dtype=torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,)
    i = torch.arange(LUT_SIZE, dtype=torch.float32)
    centres = -1.0 + (2.0 * i) / float(LUT_SIZE - 1)  # (65536,)
    return torch.searchsorted(midpoints, centres, right=False).to(torch.uint8)


def _bin_index(scaled: Tensor) -> Tensor:
    """The kernel's bin of each scaled value: uint16((clamp(v, -1, 1) + 1) · 0.5 · 65535 + 0.5)."""
    return ((scaled.clamp(-1.0, 1.0) + 1.0) * 0.5 * float(LUT_SIZE - 1) + 0.5).to(torch.int64)


def quantize_blockwise(x: Tensor, code: Tensor, blocksize: int = 256) -> tuple[Tensor, Tensor]:
    """Quantize a flat fp32 tensor to 8-bit codes in blocks, as bitsandbytes' CPU kernel.

    Args:
        x: values to quantize (any shape, fp32).
        code: 256 sorted fp32 values in [-1, 1] (e.g. `dynamic_map()`).
        blocksize: values per absmax.

    Returns:
        (codes uint8 of x's shape, absmax fp32 of shape (ceil(n / blocksize),)).
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n))
    grid = padded.view(blocks, blocksize)  # (blocks, blocksize)
    absmax = grid.abs().amax(dim=1)  # (blocks,)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    inv = 1.0 / safe  # an all-zero block's codes are forced to 0 below
    scaled = grid * inv.view(-1, 1)
    codes = _lookup_table(_lut_key(code)).to(scaled.device)[_bin_index(scaled)]
    codes = torch.where((absmax == 0).view(-1, 1), torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n].reshape(x.shape), absmax


def dequantize_blockwise(
    codes: Tensor, absmax: Tensor, code: Tensor, blocksize: int = 256
) -> Tensor:
    """x̂_i = code[q_i] · absmax_b in fp32 (flat in, flat out)."""
    flat = codes.reshape(-1)
    n = flat.numel()
    values = code[flat.long()]  # (n,) fp32
    scale = absmax.repeat_interleave(blocksize)[:n]  # (n,)
    return values * scale
