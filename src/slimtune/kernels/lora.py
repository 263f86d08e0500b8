"""Fused LoRA / QLoRA linear layers: one autograd function for base + adapter.

LoRA, Hu et al. 2021, arXiv:2106.09685; QLoRA, Dettmers et al. 2023, arXiv:2305.14314.

    x ──► x Aᵀ · s (T, r) ──► y = (x Aᵀ s) Bᵀ   (a rank-r GEMM writes y once)
    │                          │
    └─► W0 (frozen; bf16, or NF4 dequantized on the fly) ──► y += x W0ᵀ (+ bias)
                                  the base GEMM adds onto y in its epilogue (beta = 1)

    forward:   y  = s · (x Aᵀ) Bᵀ + x W0ᵀ
    backward:  gBs = s · g B                               (T, r)
               dx  = gBs A + g W0                          one buffer; the big GEMM adds last
               dA  = gBsᵀ x,   dB = gᵀ (s · x Aᵀ)

The adapter term is written first and the base GEMM accumulates onto it: the memory-bound
rank-r GEMM then writes y once, and the read of y happens inside the compute-bound base
GEMM, instead of a separate pass that reads and writes y again after it. The scale s is
applied to the small (T, r) products only.

What is saved for backward: x (shared with the sibling projections that read the same
input), the small s · x Aᵀ, and A and B in the compute dtype. The frozen weight is not
saved: a bf16 weight is a parameter already held by the model, and a 4-bit one is
dequantized again in backward, so at most one dequantized weight exists at a time (unless
the memory plan has room to hold a dequantized copy for the run, `FrozenWeight`). Their
gradients are returned in the adapters' own dtype.

`use_fast(x)` is the registry's rule (CUDA tensor and Triton importable, unless
SLIMTUNE_KERNELS=0); callers keep their plain PyTorch path as the reference elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from slimtune.quant.nf4 import QuantState4bit
from slimtune.quant.triton import dequantize, kernels_enabled

WeightFn = Callable[[torch.dtype], Tensor]  # the frozen weight (out, in) in a given dtype


def use_fast(x: Tensor) -> bool:
    """True where the fused path should run: CUDA tensors with Triton available."""
    return kernels_enabled(x)


class FrozenWeight:
    """The frozen weight (out, in) of one call, as a function of the compute dtype.

    A 4-bit weight is dequantized at each call (forward, then again in backward), so that at
    most one dequantized weight exists at a time; unless the memory plan holds a dequantized
    copy of it for the run (`held`, training/memory.py `hold_dequantized`: where its budget
    has room), which is then used as a bf16 weight is, with no dequantization at all.
    """

    def __init__(self, weight: Tensor | QuantState4bit, held: Tensor | None = None) -> None:
        self.weight, self.held = weight, held

    def __call__(self, dtype: torch.dtype) -> Tensor:
        if self.held is not None and self.held.dtype == dtype:
            return self.held
        weight = self.weight
        if isinstance(weight, QuantState4bit):
            return dequantize(weight, dtype)
        return weight if weight.dtype == dtype else weight.to(dtype)


def _weight_fn(weight: Tensor | QuantState4bit | FrozenWeight) -> WeightFn:
    """A function of the compute dtype giving the frozen weight (out, in) in that dtype."""
    return weight if isinstance(weight, FrozenWeight) else FrozenWeight(weight)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device (as F.linear would use), else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _scaled(t: Tensor, s: float) -> Tensor:
    """s · t in place (a small (T, r) tensor), no kernel when s = 1."""
    return t if s == 1 else t.mul_(s)


class _FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, bias, weight_fn: WeightFn, scaling: float, unread: bool):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)  # x itself without autocast; its low-precision copy with it
            x2 = xc.reshape(-1, x.shape[-1])  # (T, in)
            a_, b_ = a.to(dtype), b.to(dtype)
            xs = _scaled(torch.mm(x2, a_.t()), scaling)  # s · x Aᵀ  (T, r)
            if unread:  # only the graph is needed (see `unread_projection`): no GEMM
                y = x2.new_empty(x2.shape[0], b.shape[0])
            else:
                b_t = b_.t()
                y = torch.mm(xs, b_t) if bias is None else torch.addmm(bias.to(dtype), xs, b_t)
                y.addmm_(x2, weight_fn(dtype).t())  # the base GEMM adds onto it (beta = 1)
        ctx.save_for_backward(xc, a_, b_, xs)
        ctx.weight_fn, ctx.scaling, ctx.has_bias = weight_fn, scaling, bias is not None
        ctx.dtypes = (x.dtype, a.dtype, b.dtype, None if bias is None else bias.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xc, a_, b_, xs = ctx.saved_tensors
        s, dtype, (x_dtype, a_dtype, b_dtype, bias_dtype) = ctx.scaling, xc.dtype, ctx.dtypes
        with torch.autocast(xc.device.type, enabled=False):
            x2 = xc.reshape(-1, xc.shape[-1])  # (T, in)
            g = grad.reshape(-1, grad.shape[-1]).to(dtype)  # (T, out)
            gbs = _scaled(torch.mm(g, b_), s)  # s · g B  (T, r)
            dx = da = db = dbias = None
            if ctx.needs_input_grad[0]:
                dx = torch.mm(gbs, a_)  # (T, in)
                dx.addmm_(g, ctx.weight_fn(dtype))  # dequantized again, or the held copy
                dx = dx.view(xc.shape).to(x_dtype)
            if ctx.needs_input_grad[1]:
                da = torch.mm(gbs.t(), x2).to(a_dtype)  # (r, in)
            if ctx.needs_input_grad[2]:
                db = torch.mm(g.t(), xs).to(b_dtype)  # (out, r)
            if ctx.has_bias and ctx.needs_input_grad[3]:
                dbias = g.sum(0).to(bias_dtype)
        return dx, da, db, dbias, None, None, None


class _FrozenLinear(torch.autograd.Function):
    """y = x Wᵀ (+ bias) with W rebuilt in backward instead of saved (QuantLinear's path)."""

    @staticmethod
    def forward(ctx, x, bias, weight_fn: WeightFn, out_features: int, unread: bool):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            b = None if bias is None else bias.to(dtype)
            if unread:  # only the graph is needed (see `unread_projection`): no GEMM
                y = x.new_empty(*x.shape[:-1], out_features, dtype=dtype)
            else:
                y = torch.nn.functional.linear(x.to(dtype), weight_fn(dtype), b)
        ctx.weight_fn, ctx.has_bias, ctx.dtypes = weight_fn, bias is not None, (x.dtype, dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        x_dtype, dtype = ctx.dtypes
        dx = dbias = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx = torch.matmul(grad.to(dtype), ctx.weight_fn(dtype)).to(x_dtype)
            if ctx.has_bias and ctx.needs_input_grad[1]:
                dbias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return dx, dbias, None, None, None


def lora_linear(
    x: Tensor,
    weight: Tensor | QuantState4bit | FrozenWeight,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    unread: bool = False,
) -> Tensor:
    """y = x W0ᵀ + bias + scaling · (x Aᵀ) Bᵀ, fused forward and backward.

    Args:
        x: (..., in) activations; the computation runs in x.dtype.
        weight: the frozen W0 (out, in), its 4-bit QuantState4bit, or a `FrozenWeight`.
        bias: optional (out,) bias (frozen or trainable).
        lora_a: A (r, in).   lora_b: B (out, r).
        scaling: alpha / r (or alpha / sqrt(r) with rsLoRA).
        unread: nobody reads y's values, only back-propagates through it: y is left
            uninitialised and the base GEMM is skipped (backward is unchanged).
    """
    return _FusedLoraLinear.apply(x, lora_a, lora_b, bias, _weight_fn(weight), scaling, unread)


def frozen_linear(
    x: Tensor, weight: Tensor | QuantState4bit, bias: Tensor | None = None, unread: bool = False
) -> Tensor:
    """y = x W0ᵀ + bias for a frozen (e.g. 4-bit) W0 that is rebuilt, not saved, for backward."""
    out_features = weight.shape[0]
    return _FrozenLinear.apply(x, bias, _weight_fn(weight), out_features, unread)


def frozen_weight(base: torch.nn.Module) -> Tensor | QuantState4bit | None:
    """The frozen weight of a Linear or 4-bit quantized linear layer, else None."""
    for attr in ("quant_state", "state", "qweight", "weight"):
        value = getattr(base, attr, None)
        if isinstance(value, QuantState4bit):
            return value
    weight = getattr(base, "weight", None)
    if isinstance(base, torch.nn.Linear) and not weight.requires_grad:
        return weight
    return None


def _fused_parts(layer: torch.nn.Module, x: Tensor) -> tuple | None:
    """(weight, bias, A, B, scaling) of a LoRA layer the fused path applies to, else None.

    It applies on CUDA to a layer with one active, unmerged adapter, no dropout while
    training, and a frozen Linear or 4-bit base. The weight comes as a `FrozenWeight`, with the
    dequantized copy the memory plan holds on the base layer where it holds one.
    """
    if not use_fast(x) or layer.disabled or layer.merged_adapters or layer.fan_in_fan_out:
        return None
    if len(layer.active_adapters) != 1:
        return None
    (name,) = layer.active_adapters
    if name in layer.lora_dropout and layer.training and layer.lora_dropout[name].p > 0:
        return None
    base = layer.base_layer
    weight = frozen_weight(base)
    if weight is None or type(layer.lora_A[name]) is not torch.nn.Linear:
        return None
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    weight = FrozenWeight(weight, held=getattr(base, "dequantized", None))
    return weight, getattr(base, "bias", None), a, b, layer.scaling[name]


def try_lora_forward(layer: torch.nn.Module, x: Tensor, unread: bool = False) -> Tensor | None:
    """The fused forward of a LoRA layer when it applies (`_fused_parts`), else None; with
    its siblings (kernels/lora_group.py) where it has them and they apply too."""
    siblings = getattr(layer, "lora_siblings", None)
    if siblings is not None and not unread:
        y = siblings.forward(layer, x)
        if y is not None:
            return y
    parts = _fused_parts(layer, x)
    return None if parts is None else lora_linear(x, *parts, unread=unread)


def unread_projection(layer: torch.nn.Module, x: Tensor) -> Tensor | None:
    """layer(x) for a projection whose output values nobody reads, only its gradient path.

    In a recomputed decoder layer (kernels/recompute.py) the last projection's output only
    feeds the residual sum, whose backward needs no values: its base GEMM (and a 4-bit
    weight's dequantization) is skipped there, while x Aᵀ, which backward needs, is computed.
    None where the layer is neither a fused LoRA layer nor a frozen Linear / 4-bit layer.
    """
    if hasattr(layer, "fused_forward"):  # a LoRA layer (methods/lora/layers.py): fused or not
        return layer.fused_forward(x, unread=True)
    weight = frozen_weight(layer)
    if weight is None or not use_fast(x):
        return None
    return frozen_linear(x, weight, getattr(layer, "bias", None), unread=True)
