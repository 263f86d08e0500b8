"""Weight quantization for QLoRA: NF4 and FP4 (with double quantization) and int8.

    q = st.quant.quantize(weight, "nf4", blocksize=64, double_quant=True)
    q.dequantize(torch.float32)   # the weight the quantized model computes with
    q.nbytes                      # every stored byte (codes and all statistics)

NF4/FP4 are byte-identical to bitsandbytes 0.50.2 (see nf4.py for the layout); int8 is
LLM.int8()'s per-row absmax scheme (int8.py). Modules: nf4.py (4-bit codes and the torch
reference), blockwise.py (8-bit double quantization), int8.py, linear.py (QuantLinear and
quantize_model), loftq.py (LoftQ initialisation), bnb_checkpoint.py (bitsandbytes files).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimtune.errors import SlimtuneError
from slimtune.quant.int8 import QuantStateInt8, quantize_int8
from slimtune.quant.nf4 import QuantState4bit, dequantize_4bit, dequantize_nf4, quantize_4bit_state

QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

QuantState = QuantState4bit | QuantStateInt8

__all__ = [
    "BLOCKSIZES",
    "QUANT_TYPES",
    "QuantState",
    "QuantState4bit",
    "QuantStateInt8",
    "check_quant_args",
    "dequantize_4bit",
    "dequantize_nf4",
    "quantize",
]


def check_quant_args(quant: str, blocksize: int) -> None:
    """Raise a one-line SlimtuneError for an unknown quantization name or block size."""
    if quant not in QUANT_TYPES:
        raise SlimtuneError(
            f"quantization {quant!r} is not known: use one of {', '.join(QUANT_TYPES)}"
        )
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise SlimtuneError(
            f"blocksize {blocksize!r} is not accepted: use a power of two from 32 to 4096"
        )


def quantize(
    w: Tensor,
    quant: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    threshold: float = 6.0,
) -> QuantState:
    """Quantize a floating-point weight.

    Args:
        w: the weight (fp32, bf16 or fp16; any shape; int8 wants 2-D (out, in)).
        quant: "nf4", "fp4" or "int8".
        blocksize: values per absmax for nf4/fp4 (32 … 4096, powers of two).
        double_quant: nf4/fp4: store the absmax values as 8-bit codes (QLoRA's double quant).
        threshold: int8: input columns holding a |w| >= threshold stay in 16-bit (0 = none).

    Returns:
        A QuantState4bit or QuantStateInt8 with `.dequantize(dtype)` and `.nbytes`.
    """
    check_quant_args(quant, blocksize)
    if not isinstance(w, Tensor) or not w.is_floating_point():
        kind = w.dtype if isinstance(w, Tensor) else type(w).__name__
        raise SlimtuneError(
            f"cannot quantize a weight of type {kind}: give a floating-point tensor"
        )
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise SlimtuneError(
            f"cannot quantize a {w.dtype} weight: give float32, bfloat16 or float16"
        )
    w = w.detach()
    if quant == "int8":
        return quantize_int8(w, threshold)
    return quantize_4bit_state(w, quant, blocksize, double_quant)
