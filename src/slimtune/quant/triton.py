"""NF4 dequantization as one Triton kernel (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

The byte layout is bitsandbytes': two 4-bit codes per byte, the first value in the
high nibble; one absmax per block of ``blocksize`` values. With double quantization
the absmaxes are themselves 8-bit codes of a dynamic map, in blocks of 256, with one
fp32 absmax per 256 and a global fp32 offset:

    absmax[j] = code2[absmax_q[j]] · absmax2[j // 256] + offset          (fp32)
    w[i]      = (code[nibble(i)] · absmax[i // blocksize]).to(dtype)     (fp32, then rounded)

One pass reads the packed codes (½ byte a value) and writes the weight: the
statistics are read through the cache. Multiplications and additions are kept apart
(``enable_fp_fusion=False``) so the result is bit-identical to the PyTorch reference,
which rounds after each operation.
"""

from __future__ import annotations

import math
import os
from functools import cache

import torch
from torch import Tensor

from slimtune.quant.blockwise import dynamic_map
from slimtune.quant.nf4 import NESTED_BLOCKSIZE, QuantState4bit, codebook

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

# The launch: the best of `bench/gpu_kernels.py`'s sweep on an H200 (bench/NOTES.md run 30):
# 67 µs for a (14336, 4096) weight (2.2 TB/s), where the H100's best (1024 bytes, 2 warps,
# run 7) was not among the six fastest (all ≥ 73 µs)
_BYTES_PER_PROGRAM = 4096  # each program reads 4096 bytes and writes 8192 values
_NUM_WARPS = 8
_EVICT = "evict_first"  # the stores: a written weight (117 MB here) is larger than L2
_TILED = True  # the (blocks, blocksize/2) tiling: one statistics load per block

if triton is not None:

    @triton.jit
    def _dequant_nf4_kernel(
        packed_ptr,  # (ceil(n/2),) uint8
        absmax_ptr,  # (n_blocks,) fp32, or uint8 codes when DOUBLE
        code_ptr,  # (16,) fp32
        absmax2_ptr,  # (ceil(n_blocks/blocksize2),) fp32 (only read when DOUBLE)
        code2_ptr,  # (256,) fp32 (only read when DOUBLE)
        offset_ptr,  # (1,) fp32 (only read when DOUBLE)
        out_ptr,  # (n,) dtype
        n,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        DOUBLE: tl.constexpr,
        BF16: tl.constexpr,
        BYTES: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        byte = pid * BYTES + tl.arange(0, BYTES)  # (BYTES,)
        byte_mask = byte * 2 < n
        b = tl.load(packed_ptr + byte, mask=byte_mask, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (b >> 4))  # (BYTES,) fp32, value 2·byte
        lo = tl.load(code_ptr + (b & 15))  # (BYTES,) fp32, value 2·byte + 1
        # Both values of a byte share a block: blocksize is even.
        blk = (byte * 2) // BLOCKSIZE
        if DOUBLE:
            q = tl.load(absmax_ptr + blk, mask=byte_mask, other=0).to(tl.int32)
            a = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=byte_mask)
            a = a + tl.load(offset_ptr)
        else:
            a = tl.load(absmax_ptr + blk, mask=byte_mask, other=0.0)
        vals = tl.join(hi * a, lo * a)  # (BYTES, 2): high nibble first
        vals = tl.reshape(vals, (2 * BYTES,))
        if BF16:  # round to nearest even by hand: same bits on the GPU and in the interpreter
            bits = vals.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            vals = (bits >> 16).to(tl.int16)  # out_ptr is the bf16 result viewed as int16
        else:
            vals = vals.to(out_ptr.dtype.element_ty)
        idx = pid * 2 * BYTES + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + idx, vals, mask=idx < n)

    @triton.jit
    def _dequant_nf4_rows_kernel(
        packed_ptr,
        absmax_ptr,
        code_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        out_ptr,
        n,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        DOUBLE: tl.constexpr,
        BF16: tl.constexpr,
        ROWS: tl.constexpr,
        EVICT: tl.constexpr = "",
    ):
        """Same result, tiled (ROWS quantization blocks, BLOCKSIZE/2 bytes): one absmax per row."""
        HALF: tl.constexpr = BLOCKSIZE // 2
        blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        col = tl.arange(0, HALF)  # (HALF,)
        byte = blk[:, None] * HALF + col[None, :]  # (ROWS, HALF)
        byte_mask = byte * 2 < n
        b = tl.load(packed_ptr + byte, mask=byte_mask, other=0).to(tl.int32)
        blk_mask = blk * BLOCKSIZE < n
        if DOUBLE:
            q = tl.load(absmax_ptr + blk, mask=blk_mask, other=0).to(tl.int32)
            a = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=blk_mask)
            a = a + tl.load(offset_ptr)
        else:
            a = tl.load(absmax_ptr + blk, mask=blk_mask, other=0.0)
        hi = tl.load(code_ptr + (b >> 4)) * a[:, None]  # (ROWS, HALF)
        lo = tl.load(code_ptr + (b & 15)) * a[:, None]
        vals = tl.reshape(tl.join(hi, lo), (ROWS, BLOCKSIZE))  # high nibble first
        if BF16:
            bits = vals.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            vals = (bits >> 16).to(tl.int16)
        else:
            vals = vals.to(out_ptr.dtype.element_ty)
        idx = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (ROWS, BLOCKSIZE)
        tl.store(out_ptr + idx, vals, mask=idx < n, eviction_policy=EVICT)


@cache
def _interpreted(kernel):
    """The same kernel run by Triton's CPU interpreter (used for CPU tensors: tests, CI)."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(kernel.fn)


def launch(kernel, t: Tensor, grid: tuple[int, ...], *args, num_warps: int = 4, **consts):
    """Run the compiled kernel on CUDA tensors, the interpreter's version on CPU ones."""
    if t.device.type == "cpu":
        return _interpreted(kernel)[grid](*args, **consts)
    return kernel[grid](*args, num_warps=num_warps, **consts)


def triton_available() -> bool:
    """True when Triton imports (the kernels can run, on CUDA or in the interpreter)."""
    return triton is not None


def dequantize_nf4_triton(
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    blocksize: int = 64,
    absmax2: Tensor | None = None,
    code2: Tensor | None = None,
    offset: float | Tensor = 0.0,
    blocksize2: int = 256,
    out: Tensor | None = None,
    bytes_per_program: int = _BYTES_PER_PROGRAM,
    num_warps: int = _NUM_WARPS,
    tiled: bool = _TILED,
    evict: str = _EVICT,
) -> Tensor:
    """Dequantize packed 4-bit codes to ``dtype`` with one Triton launch.

    Args:
        packed: uint8 codes, two per byte, high nibble first (any shape, read flat).
        absmax: fp32 absmax per block, or uint8 codes of it when ``absmax2`` is given.
        code: the 16 fp32 values of the 4-bit codebook (NF4 or FP4).
        shape: shape of the weight to return.
        dtype: dtype of the result (bf16, fp16 or fp32).
        blocksize: values per absmax (even).
        absmax2, code2, offset, blocksize2: the double-quantization state.
        out: optional preallocated result (reused across calls to save allocations).
    """
    if triton is None:
        raise RuntimeError("dequantize_nf4_triton needs triton")
    n = math.prod(shape)
    if blocksize % 2:
        raise ValueError(f"blocksize must be even, got {blocksize}")
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    double = absmax2 is not None
    if not isinstance(offset, Tensor):
        offset = torch.tensor([offset], dtype=torch.float32, device=packed.device)
    dummy = absmax  # stands in for the unused pointers when not double-quantized
    tiled = tiled and blocksize & (blocksize - 1) == 0  # tl.arange needs a power of two
    rows = max(1, bytes_per_program // (blocksize // 2))
    kernel = _dequant_nf4_rows_kernel if tiled else _dequant_nf4_kernel
    grid = (
        (triton.cdiv(triton.cdiv(n, blocksize), rows),)
        if tiled
        else (triton.cdiv(triton.cdiv(n, 2), bytes_per_program),)
    )
    extra = {"enable_fp_fusion": False, "num_warps": num_warps}
    if packed.device.type == "cpu":
        kernel, extra = _interpreted(kernel), {}
    extra |= {"ROWS": rows, "EVICT": evict} if tiled else {"BYTES": bytes_per_program}
    kernel[grid](
        packed.reshape(-1).view(torch.uint8),
        absmax.reshape(-1),
        code,
        absmax2 if double else dummy,
        code2 if double else code,
        offset.reshape(-1).float(),
        out.view(torch.int16) if dtype == torch.bfloat16 else out,
        n,
        BLOCKSIZE=blocksize,
        BLOCKSIZE2=blocksize2,
        DOUBLE=double,
        BF16=dtype == torch.bfloat16,
        **extra,
    )
    return out


@cache
def _device_codebooks(quant_type: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """The 4-bit levels and the 8-bit dynamic map, copied once per device."""
    return codebook(quant_type).to(device), dynamic_map().to(device)


def dequantize_state_triton(
    state: QuantState4bit, dtype: torch.dtype | None = None, **launch
) -> Tensor:
    """Triton twin of ``QuantState4bit.dequantize``: the same bits, one launch."""
    code, code2 = _device_codebooks(state.quant_type, state.codes.device)
    return dequantize_nf4_triton(
        state.codes,
        state.absmax,
        code,
        tuple(state.shape),
        dtype or state.dtype,
        state.blocksize,
        absmax2=state.absmax2,
        code2=code2 if state.double_quant else None,
        offset=state.offset if state.double_quant else 0.0,
        blocksize2=NESTED_BLOCKSIZE,
        **launch,
    )


def kernels_enabled(t: Tensor) -> bool:
    """The registry's rule: fast kernels for CUDA tensors when Triton imports.

    ``SLIMTUNE_KERNELS=0`` turns them off (the reference path then runs everywhere).
    """
    return t.is_cuda and triton is not None and os.environ.get("SLIMTUNE_KERNELS", "1") != "0"


def dequantize(state: QuantState4bit, dtype: torch.dtype | None = None) -> Tensor:
    """Dequantize with the Triton kernel on CUDA, with the torch reference elsewhere."""
    if kernels_enabled(state.codes):
        return dequantize_state_triton(state, dtype)
    return state.dequantize(dtype)
