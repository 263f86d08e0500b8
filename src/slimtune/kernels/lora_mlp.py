"""A gated MLP's gate and up LoRA projections and its activation as one autograd function.

    xs = x [s_g A_g; s_u A_u]ᵀ                      (T, r_g + r_u): one read of x
    a  = bf16(x W_gᵀ + xs_g B_gᵀ),   b = bf16(x W_uᵀ + xs_u B_uᵀ)
    h  = act(a) · b                       act = SiLU (SwiGLU) or tanh-GELU (GeGLU), as
                                          kernels/llama_ops.py computes them

The base GEMMs write x Wᵀ alone, and the Triton kernel adds each rank-r term to the tile it
reads, as a (rows × r)·(r × columns) product: the two (T, I) LoRA products are never written
to memory nor read back (on a Llama-3-8B layer with T = 8192 that is 2 × 235 MB each way).
Backward recomputes a and b from the same saved tensors, writes da and db, and hands them to
the sibling backward of kernels/lora_group.py (dx, every A and B).

Saved for backward: x, xs, A and B in the compute dtype, and the two base outputs x Wᵀ
(what the separate SwiGLU saved as a and b): the same memory as the unfused layers.

`rebuilt_in_backward(h)`: the down projection, which saves h (T × I) for its dA, keeps instead
a recipe pointing at what this function saved already, and backward rebuilds h with one more
forward tile pass (about 0.2 ms on an 8B layer at T = 8192, against its 224 MiB): the memory
plan (training/memory.py) turns it on when the budget would otherwise recompute layers.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import Tensor, nn

from slimtune.kernels.lora import _compute_dtype, _fused_parts, _weight_fn
from slimtune.kernels.lora_group import _scale_columns, group_backward
from slimtune.quant.triton import launch, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _lora_gated(
        yg_ptr, yu_ptr, xs_ptr, bg_ptr, bu_ptr, dh_ptr, h_ptr, da_ptr, db_ptr, T, N, ld_xs,
        RG: tl.constexpr, RU: tl.constexpr, PG: tl.constexpr, PU: tl.constexpr,
        BT: tl.constexpr, BN: tl.constexpr, GELU: tl.constexpr, BACKWARD: tl.constexpr,
    ):  # fmt: skip
        """One (BT rows × BN columns) tile: a, b with their rank-r terms, then h (forward)
        or da, db (backward). PG, PU: the ranks padded to a power of two ≥ 16 (tl.dot)."""
        rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        rmask, cmask = rows < T, cols < N
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * N + cols[None, :]
        kg, ku = tl.arange(0, PG), tl.arange(0, PU)
        xs_g = tl.load(xs_ptr + rows[:, None] * ld_xs + kg[None, :],
                       mask=rmask[:, None] & (kg < RG)[None, :], other=0.0)  # fmt: skip
        xs_u = tl.load(xs_ptr + rows[:, None] * ld_xs + RG + ku[None, :],
                       mask=rmask[:, None] & (ku < RU)[None, :], other=0.0)  # fmt: skip
        bg = tl.load(
            bg_ptr + cols[None, :] * RG + kg[:, None],
            mask=(kg < RG)[:, None] & cmask[None, :],
            other=0.0,
        )  # (PG, BN): B_gᵀ
        bu = tl.load(bu_ptr + cols[None, :] * RU + ku[:, None],
                     mask=(ku < RU)[:, None] & cmask[None, :], other=0.0)  # fmt: skip
        yg = tl.load(yg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        yu = tl.load(yu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = (yg + tl.dot(xs_g, bg)).to(yg_ptr.dtype.element_ty).to(tl.float32)
        b = (yu + tl.dot(xs_u, bu)).to(yu_ptr.dtype.element_ty).to(tl.float32)
        if GELU:
            z = 0.7978845608028654 * (a + 0.044715 * a * a * a)
            t = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * z))  # tanh(z)
            act = 0.5 * a * (1.0 + t)
        else:
            s = 1.0 / (1.0 + tl.exp(-a))
            act = a * s
        if BACKWARD:
            dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(db_ptr + offs, (dh * act).to(db_ptr.dtype.element_ty), mask=mask)
            if GELU:
                dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
                dact = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * dz
            else:
                dact = s * (1.0 + a * (1.0 - s))
            tl.store(da_ptr + offs, (dh * b * dact).to(da_ptr.dtype.element_ty), mask=mask)
        else:
            act = act.to(h_ptr.dtype.element_ty).to(tl.float32)  # rounded, as act(a) is
            tl.store(h_ptr + offs, (act * b).to(h_ptr.dtype.element_ty), mask=mask)


# (forward, backward) tiles: the fastest of bench/lora_mlp_tiles.py's sweep on an H200 (bench/
# NOTES.md run 26): 209 µs forward and 394 µs backward on an 8B MLP, 3.4 and 3.0 TB/s
TILES = (
    {"BT": 32, "BN": 128, "num_warps": 4},
    {"BT": 32, "BN": 64, "num_warps": 4},
)


def _padded(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _tiles(yg, yu, xs, bg, bu, gelu: bool, dh=None, tiles: dict | None = None):
    """h, or (da, db) when dh is given, over (T, I) tiles (`TILES` unless given)."""
    tiles = tiles or TILES[dh is not None]
    t, n = yg.shape
    out = [torch.empty_like(yg)] if dh is None else [torch.empty_like(yg), torch.empty_like(yg)]
    h, da, db = (out[0], yg, yg) if dh is None else (yg, *out)
    rg, ru = bg.shape[1], bu.shape[1]
    grid = (triton.cdiv(t, tiles["BT"]), triton.cdiv(n, tiles["BN"]))
    launch(_lora_gated, yg, grid, yg, yu, xs, bg, bu, yg if dh is None else dh, h, da, db,
           t, n, xs.stride(0), RG=rg, RU=ru, PG=_padded(rg), PU=_padded(ru),
           GELU=gelu, BACKWARD=dh is not None, **tiles)  # fmt: skip
    return out[0] if dh is None else out


class _LoraGatedUnit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gelu: bool, a_g, a_u, b_g, b_u, weight_g, weight_u, s_g, s_u):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            x2 = xc.reshape(-1, x.shape[-1])  # (T, in)
            a_cat = torch.cat([a_g.to(dtype), a_u.to(dtype)])  # (r_g + r_u, in)
            ranks, scales = [a_g.shape[0], a_u.shape[0]], (s_g, s_u)
            xs = _scale_columns(torch.mm(x2, a_cat.t()), ranks, scales)  # s x Aᵀ per sibling
            yg = torch.mm(x2, weight_g(dtype).t())  # (T, I): the base GEMMs alone
            yu = torch.mm(x2, weight_u(dtype).t())
            bg, bu = b_g.to(dtype).contiguous(), b_u.to(dtype).contiguous()
            h = _tiles(yg, yu, xs, bg, bu, gelu)
        ctx.save_for_backward(xc, a_cat, xs, bg, bu, yg, yu)
        ctx.n, ctx.ranks, ctx.scales, ctx.weight_fns = 2, ranks, scales, (weight_g, weight_u)
        ctx.dtypes = (x.dtype, [a_g.dtype, a_u.dtype], [b_g.dtype, b_u.dtype])
        ctx.bias_dtypes, ctx.gelu = [None, None], gelu
        return h.view(*x.shape[:-1], h.shape[-1])

    @staticmethod
    def backward(ctx, dh):
        xc, a_cat, xs, bg, bu, yg, yu = ctx.saved_tensors
        with torch.autocast(xc.device.type, enabled=False):
            dh2 = dh.reshape(yg.shape).to(yg.dtype).contiguous()
            da, db = _tiles(yg, yu, xs, bg, bu, ctx.gelu, dh=dh2)
        needs = ctx.needs_input_grad  # x, gelu, A_g, A_u, B_g, B_u, …
        wanted = (needs[0], needs[2:4], needs[4:6], (False, False))
        dx, das, dbs, _ = group_backward(ctx, (xc, a_cat, xs, bg, bu), (da, db), wanted)
        return (dx, None, *das, *dbs, None, None, None, None)


def lora_gated_mlp(mlp: nn.Module, x: Tensor, gelu: bool) -> Tensor | None:
    """act(gate_proj(x)) · up_proj(x) as one function where both projections are plain LoRA
    layers on the fused path (kernels/lora.py `_fused_parts`) without a bias; else None."""
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    if not all(hasattr(m, "fuses") and m.fuses() for m in (gate, up)):
        return None
    parts = [_fused_parts(m, x) for m in (gate, up)]
    if any(p is None or p[1] is not None for p in parts):
        return None
    (wg, _, ag, bg, sg), (wu, _, au, bu, su) = parts
    return _LoraGatedUnit.apply(x, gelu, ag, au, bg, bu, _weight_fn(wg), _weight_fn(wu), sg, su)


class _Rebuilt:
    """h as the gated function's node that can rebuild it (its saved tensors, its shape)."""

    def __init__(self, node, shape: torch.Size) -> None:
        self.node, self.shape = node, shape

    def tensor(self) -> Tensor:
        _, _, xs, bg, bu, yg, yu = self.node.saved_tensors
        return _tiles(yg, yu, xs, bg, bu, self.node.gelu).view(self.shape)


@contextlib.contextmanager
def rebuilt_in_backward(h: Tensor):
    """Within: a function that saves h for backward keeps how to rebuild it instead (h must be
    `lora_gated_mlp`'s output). Its values come back bit for bit, from the same kernel."""
    node, shape = h.grad_fn, h.shape
    target = weakref.ref(h)  # the hooks live as long as what they saved: no hold on h

    def pack(t: Tensor):
        return _Rebuilt(node, shape) if t is target() else t

    def unpack(t):
        return t.tensor() if isinstance(t, _Rebuilt) else t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
