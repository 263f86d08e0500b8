"""Sibling LoRA projections of one input (q/k/v, gate/up) as one autograd function.

The projections an attention block or a gated MLP applies to the same x each read x for
their x Aᵀ, and autograd sums their n input gradients with n − 1 extra passes. Together:

    forward:   xs = x [s₁A₁; …; sₙAₙ]ᵀ                 (T, n·r): one read of x for every A
               y_i = xs_i B_iᵀ,  then y_i += x W_iᵀ       (kernels/lora.py, per projection)
    backward:  gbs_i = s_i g_i B_i                        (T, r)
               dx = [gbs_1 … gbsₙ] [A₁; …; Aₙ]  then  dx += g_i W_i for each i
                                                       (the base GEMMs add onto one buffer)
               [dA₁; …; dAₙ] = [gbs_1 … gbsₙ]ᵀ x         (one read of x),  dB_i = g_iᵀ xs_i

The modules keep being called one by one (transformers' attention calls q_proj, k_proj,
v_proj in turn): the first sibling computes every output and leaves the others' on the
group, and each later sibling takes its own if it is called with the very same x,
unchanged. Anything else (another input or order, a sibling off the fused path) runs alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimtune.kernels.lora import _compute_dtype, _fused_parts, _weight_fn


class Siblings:
    """Projections of one module that read the same input, in call order."""

    def __init__(self, members: list[torch.nn.Module]) -> None:
        self.members = members
        self.pending: tuple[Tensor, int, dict[int, Tensor]] | None = None  # (x, version, outputs)

    def forward(self, layer: torch.nn.Module, x: Tensor) -> Tensor | None:
        """`layer`'s output from the group's shared computation, or None (run it alone)."""
        index = next(i for i, m in enumerate(self.members) if m is layer)
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] is x and pending[1] == x._version:
            outputs = pending[2]
            if index in outputs:
                y = outputs.pop(index)
                self.pending = pending if outputs else None
                return y
        if index != 0:  # only the first sibling starts the shared computation
            return None
        parts = [_fused_parts(m, x) for m in self.members]
        if any(p is None for p in parts):
            return None
        ys = _FusedLoraGroup.apply(x, len(parts), *_flatten(parts))
        others = {i: y for i, y in enumerate(ys) if i != index}
        self.pending = (x, x._version, others) if others else None
        return ys[index]


def _flatten(parts: list[tuple]) -> list:
    """(weight, bias, A, B, s) per sibling -> [A…, B…, bias…, weight_fn…, s…]."""
    weights, biases, a, b, scales = zip(*parts, strict=True)
    return [*a, *b, *biases, *(_weight_fn(w) for w in weights), *scales]


def _scale_columns(t: Tensor, ranks: list[int], scales) -> Tensor:
    """t (T, n·r) with sibling i's r_i columns times s_i, in place; no kernel when every s_i
    is 1 (as kernels/lora.py `_scaled` for one projection)."""
    if all(s == 1 for s in scales):
        return t
    return t.mul_(torch.cat([t.new_full((r,), s) for r, s in zip(ranks, scales, strict=True)]))


class _FusedLoraGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n: int, *flat):
        a, b = flat[:n], flat[n : 2 * n]
        biases, weight_fns, scales = flat[2 * n : 3 * n], flat[3 * n : 4 * n], flat[4 * n :]
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            x2 = xc.reshape(-1, x.shape[-1])  # (T, in)
            a_cat = torch.cat([t.to(dtype) for t in a])  # (n·r, in)
            ranks = [t.shape[0] for t in a]
            xs = _scale_columns(torch.mm(x2, a_cat.t()), ranks, scales)  # s_i x A_iᵀ
            b_ = [t.to(dtype) for t in b]
            ys = []
            for xs_i, b_i, bias, weight_fn in zip(
                xs.split(ranks, 1), b_, biases, weight_fns, strict=True
            ):
                y = (
                    torch.mm(xs_i, b_i.t())
                    if bias is None
                    else torch.addmm(bias.to(dtype), xs_i, b_i.t())
                )
                y.addmm_(x2, weight_fn(dtype).t())  # the base GEMM adds onto it
                ys.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.save_for_backward(xc, a_cat, xs, *b_)
        ctx.n, ctx.ranks, ctx.scales, ctx.weight_fns = n, ranks, scales, weight_fns
        ctx.dtypes = (x.dtype, [t.dtype for t in a], [t.dtype for t in b])
        ctx.bias_dtypes = [None if t is None else t.dtype for t in biases]
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        n, needs = ctx.n, ctx.needs_input_grad
        wanted = (
            needs[0],
            needs[2 : 2 + n],
            needs[2 + n : 2 + 2 * n],
            needs[2 + 2 * n : 2 + 3 * n],
        )
        dx, das, dbs, dbias = group_backward(ctx, ctx.saved_tensors, grads, wanted)
        return (dx, None, *das, *dbs, *dbias, *([None] * (2 * n)))


def group_backward(ctx, saved, grads, wanted) -> tuple:
    """(dx, [dA_i], [dB_i], [dbias_i]) of siblings from their outputs' gradients (module
    docstring). `saved` = (x, A_cat, xs, B_i…); ctx holds n, ranks, scales, weight_fns,
    dtypes, bias_dtypes; `wanted` = (dx?, [dA_i?], [dB_i?], [dbias_i?])."""
    xc, a_cat, xs, *b_ = saved
    x_dtype, a_dtypes, b_dtypes = ctx.dtypes
    dtype, n = xc.dtype, ctx.n
    want_dx, want_a, want_b, want_bias = wanted
    with torch.autocast(xc.device.type, enabled=False):
        x2 = xc.reshape(-1, xc.shape[-1])
        gs = [
            x2.new_zeros(x2.shape[0], b.shape[0]) if g is None else g.reshape(-1, g.shape[-1])
            for g, b in zip(grads, b_, strict=True)
        ]
        gs = [g.to(dtype) for g in gs]
        gbs = torch.cat([torch.mm(g, b) for g, b in zip(gs, b_, strict=True)], 1)  # (T, n·r)
        _scale_columns(gbs, ctx.ranks, ctx.scales)
        dx = None
        if want_dx:
            dx = torch.mm(gbs, a_cat)  # (T, in)
            for g, weight_fn in zip(gs, ctx.weight_fns, strict=True):
                dx.addmm_(g, weight_fn(dtype))  # dequantized again, or the held copy
            dx = dx.view(xc.shape).to(x_dtype)
        das = [None] * n
        if any(want_a):
            da = torch.mm(gbs.t(), x2).split(ctx.ranks)  # (r_i, in) each
            das = [d.to(t) for d, t in zip(da, a_dtypes, strict=True)]
        dbs = [
            torch.mm(g.t(), xs_i).to(t) if want else None
            for g, xs_i, t, want in zip(gs, xs.split(ctx.ranks, 1), b_dtypes, want_b, strict=True)
        ]
        dbias = [
            g.sum(0).to(t) if t is not None and want else None
            for g, t, want in zip(gs, ctx.bias_dtypes, want_bias, strict=True)
        ]
    return dx, das, dbs, dbias


def link_siblings(members: list[torch.nn.Module]) -> bool:
    """Let LoRA layers that read the same input compute together; False if fewer than two
    are LoRA layers (kernels/lora.py `try_lora_forward` consults the link)."""
    members = [m for m in members if hasattr(m, "fuses") and m.fuses()]
    if len(members) < 2:
        return False
    group = Siblings(members)
    for m in members:
        m.lora_siblings = group
    return True
