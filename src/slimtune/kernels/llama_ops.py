"""Triton RMSNorm, SwiGLU/GeGLU and RoPE for frozen decoder blocks (the elementwise part of a step).

RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), SwiGLU and GeGLU (Shazeer 2020,
arXiv:2002.05202), computed as transformers' modules compute them, one pass each:

    rmsnorm:  r = 1 / sqrt(mean(x²) + eps)   (fp32),   y = w · bf16(x · r)     Llama, Mistral,
              dx = r · (g w - x̂ · mean(g w x̂)),   x̂ = x · r            Qwen2/3, Phi-3
    gemma:    y = bf16(x̂ · (1 + w)) in fp32, dx as above with w -> 1 + w   Gemma 1/2/3
    swiglu:   h = bf16(silu(a)) · b,   silu(a) = a · σ(a)
              db = dh · silu(a),   da = dh · b · σ(a) (1 + a (1 - σ(a)))
    geglu:    h = bf16(gelu_tanh(a)) · b,  gelu_tanh(a) = a/2 · (1 + tanh(k (a + 0.044715 a³)))
              da = dh · b · (½ (1 + t) + ½ a (1 - t²) k (1 + 3 · 0.044715 a²)),  k = √(2/π)

transformers' versions upcast, square, reduce, scale and cast in separate kernels and
keep several fp32 intermediates for backward; these read and write each tensor once and
keep only their inputs (plus one fp32 per row). `patch_llama(model)` routes the model's
RMSNorm and MLP modules through them for CUDA tensors where the family's math is the one
above (`FAMILY_NORMS`, SiLU or tanh-GELU gates); elsewhere, and for a trainable norm weight,
the modules' own forward (the reference twin) runs.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from slimtune.kernels.lora import unread_projection
from slimtune.kernels.lora_group import link_siblings
from slimtune.kernels.lora_mlp import lora_gated_mlp, rebuilt_in_backward
from slimtune.kernels.recompute import recomputing
from slimtune.quant.triton import kernels_enabled, launch, triton

if triton is not None:
    import triton.language as tl

    # Row sums use tl.reduce with the standard sum: tl.sum itself is a @jit helper, which
    # Triton's interpreter can only call when TRITON_INTERPRET was set before importing triton.
    @triton.jit
    def _rmsnorm_fwd(
        x_ptr, w_ptr, y_ptr, rstd_ptr, d, eps, BLOCK: tl.constexpr, GEMMA: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < d
        x = tl.load(x_ptr + row * d + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.reduce(x * x, 0, tl.standard._sum_combine) / d + eps)
        n = x * rstd
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if GEMMA:  # (x̂ · (1 + w)) rounded once
            w = w + 1.0
        else:  # w · bf16(x̂)
            n = n.to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + row * d + cols, (w * n).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rmsnorm_bwd(
        g_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, d, BLOCK: tl.constexpr, GEMMA: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < d
        x = tl.load(x_ptr + row * d + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * d + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if GEMMA:
            w = w + 1.0
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        gw = g * w
        dx = rstd * (gw - xhat * (tl.reduce(gw * xhat, 0, tl.standard._sum_combine) / d))
        tl.store(dx_ptr + row * d + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_fwd(a_ptr, b_ptr, h_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        a = tl.load(a_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        act = (a * 1.0 / (1.0 + tl.exp(-a))).to(h_ptr.dtype.element_ty).to(tl.float32)
        tl.store(h_ptr + idx, (act * b).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(dh_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        dh = tl.load(dh_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-a))
        act = a * s
        tl.store(db_ptr + idx, (dh * act).to(db_ptr.dtype.element_ty), mask=mask)
        da = dh * b * s * (1.0 + a * (1.0 - s))
        tl.store(da_ptr + idx, da.to(da_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_fwd(a_ptr, b_ptr, h_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        a = tl.load(a_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        z = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        t = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * z))  # tanh(z)
        act = (0.5 * a * (1.0 + t)).to(h_ptr.dtype.element_ty).to(tl.float32)
        tl.store(h_ptr + idx, (act * b).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_bwd(dh_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        dh = tl.load(dh_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        z = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        t = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * z))
        tl.store(db_ptr + idx, (dh * 0.5 * a * (1.0 + t)).to(db_ptr.dtype.element_ty), mask=mask)
        dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
        dact = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * dz
        tl.store(da_ptr + idx, (dh * b * dact).to(da_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        x_ptr, out_ptr, cos_ptr, sin_ptr, H, T,
        sxb, sxh, sxt, sob, soh, sot, scb, sct,
        HALF: tl.constexpr, ROWS: tl.constexpr, BACKWARD: tl.constexpr,
    ):  # fmt: skip
        """ROWS positions of one (batch, head): x = [x1, x2] -> [x1 c1 - x2 s1, x2 c2 + x1 s2]."""
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        t = tl.program_id(1) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        c = tl.arange(0, HALF)  # (HALF,)
        mask = (t < T)[:, None]
        xp = x_ptr + b.to(tl.int64) * sxb + h * sxh + t[:, None].to(tl.int64) * sxt + c[None, :]
        cp = b.to(tl.int64) * scb + t[:, None].to(tl.int64) * sct + c[None, :]
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + cp, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + cp + HALF, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + cp, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + cp + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose: d1 = g1 c1 + g2 s2,  d2 = g2 c2 - g1 s1
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        op = out_ptr + b.to(tl.int64) * sob + h * soh + t[:, None].to(tl.int64) * sot + c[None, :]
        tl.store(op, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(op + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


_SWIGLU_BLOCK = 1024


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, gemma: bool) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (T, d)
        rows, d = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(d)
        warps = 8 if block >= 4096 else 4
        launch(_rmsnorm_fwd, x, (rows,), x2, weight, y, rstd, d, eps,
                BLOCK=block, GEMMA=gemma, num_warps=warps)  # fmt: skip
        ctx.save_for_backward(x2, weight, rstd)
        ctx.gemma = gemma
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, weight, rstd = ctx.saved_tensors
        rows, d = x2.shape
        g = grad.reshape(rows, d).contiguous()
        dx = torch.empty_like(x2)
        block = triton.next_power_of_2(d)
        warps = 8 if block >= 4096 else 4
        launch(_rmsnorm_bwd, g, (rows,), g, x2, weight, rstd, dx, d,
                BLOCK=block, GEMMA=ctx.gemma, num_warps=warps)  # fmt: skip
        return dx.view(grad.shape), None, None, None


class _GatedUnit(torch.autograd.Function):
    """h = act(a) · b with act SiLU (SwiGLU) or tanh-GELU (GeGLU)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, gelu: bool) -> Tensor:
        a, b = a.contiguous(), b.contiguous()
        h = torch.empty_like(a)
        grid = (triton.cdiv(a.numel(), _SWIGLU_BLOCK),)
        kernel = _geglu_fwd if gelu else _swiglu_fwd
        launch(kernel, a, grid, a, b, h, a.numel(), BLOCK=_SWIGLU_BLOCK)
        ctx.save_for_backward(a, b)
        ctx.gelu = gelu
        return h

    @staticmethod
    def backward(ctx, dh: Tensor):
        a, b = ctx.saved_tensors
        dh = dh.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        grid = (triton.cdiv(a.numel(), _SWIGLU_BLOCK),)
        kernel = _geglu_bwd if ctx.gelu else _swiglu_bwd
        launch(kernel, a, grid, dh, a, b, da, db, a.numel(), BLOCK=_SWIGLU_BLOCK)
        return da, db, None


def _rope_launch(x: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> Tensor:
    """The output keeps x's layout: q and k are (B, T, H, D) in memory, seen as (B, H, T, D),
    so neither the forward nor the gradient's way back through the view needs a copy."""
    bsz, heads, seq, dim = x.shape  # (B, H, T, D), last dim contiguous
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x)  # the same strides as x
    rows = 16
    grid = (bsz * heads, triton.cdiv(seq, rows))
    scb = cos.stride(0) if cos.shape[0] > 1 else 0
    launch(
        _rope_kernel, x, grid, x, out, cos, sin, heads, seq,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        scb, cos.stride(1), HALF=dim // 2, ROWS=rows, BACKWARD=backward,
    )  # fmt: skip
    return out


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, cos, sin, False), _rope_launch(k, cos, sin, False)

    @staticmethod
    def backward(ctx, gq: Tensor, gk: Tensor):
        cos, sin = ctx.saved_tensors
        dq = _rope_launch(gq, cos, sin, True)
        dk = _rope_launch(gk, cos, sin, True)
        return dq, dk, None, None


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q, k (B, H, T, D) with cos, sin (B or 1, T, D), one kernel each way.

    Su et al. 2021, arXiv:2104.09864, in transformers' rotate-half layout:
    q' = q · cos + rotate_half(q) · sin,  rotate_half([x1, x2]) = [-x2, x1].
    """
    return _RoPE.apply(q, k, cos.contiguous(), sin.contiguous())


def rms_norm(x: Tensor, weight: Tensor, eps: float, gemma: bool = False) -> Tensor:
    """RMSNorm with a frozen weight, as one Triton kernel each way: Llama's w · bf16(x̂), or
    with `gemma` Gemma's bf16(x̂ · (1 + w))."""
    return _RMSNorm.apply(x, weight, eps, gemma)


def silu_mul(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) · b (Llama's MLP activation) as one Triton kernel each way."""
    return _GatedUnit.apply(a, b, False)


def gelu_mul(a: Tensor, b: Tensor) -> Tensor:
    """gelu_tanh(a) · b (Gemma's MLP activation) as one Triton kernel each way."""
    return _GatedUnit.apply(a, b, True)


# RMSNorm classes by their math: Llama's w · bf16(x̂) (eps in variance_epsilon), or Gemma's
# bf16(x̂ · (1 + w)) in fp32 (eps in eps). Others keep their own forward.
FAMILY_NORMS = {
    "LlamaRMSNorm": False, "MistralRMSNorm": False, "Qwen2RMSNorm": False,
    "Qwen3RMSNorm": False, "Phi3RMSNorm": False,
    "GemmaRMSNorm": True, "Gemma2RMSNorm": True, "Gemma3RMSNorm": True,
}  # fmt: skip


def _norm_forward(self, x: Tensor) -> Tensor:
    if kernels_enabled(x) and not self.weight.requires_grad:
        gemma = FAMILY_NORMS[type(self).__name__]
        eps = self.eps if gemma else self.variance_epsilon
        return rms_norm(x, self.weight, eps, gemma)
    return type(self).forward(self, x)


def _gate_kind(act: nn.Module) -> bool | None:
    """False: SiLU gate; True: tanh-approximated GELU gate; None: another activation."""
    if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return False
    if isinstance(act, nn.GELU) and act.approximate == "tanh":
        return True
    fn = getattr(act, "act", None)  # transformers' GELUTanh holds partial(gelu, approximate=tanh)
    if type(act).__name__ == "PytorchGELUTanh" and fn is None:  # older transformers
        return True
    if type(act).__name__ == "GELUTanh" and getattr(fn, "keywords", {}) == {"approximate": "tanh"}:
        return True
    return None


# Decoder layers whose MLP output goes straight into the residual sum (`residual + mlp(h)`,
# Phi-3 with dropout between): backward needs none of its values (Gemma 2/3 normalise it first)
RESIDUAL_LAST = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer",
                 "Qwen3DecoderLayer", "Phi3DecoderLayer", "GemmaDecoderLayer"}  # fmt: skip


def _down(mlp: nn.Module, h: Tensor) -> Tensor:
    """down_proj(h); while the layer is recomputed for backward, without its base GEMM where
    only the residual sum reads it (kernels/lora.py `unread_projection`)."""
    if recomputing() and getattr(mlp, "feeds_residual_only", False):
        y = unread_projection(mlp.down_proj, h)
        if y is not None:
            return y
    return mlp.down_proj(h)


def _mlp_forward(self, x: Tensor) -> Tensor:
    if kernels_enabled(x):
        gelu = bool(_gate_kind(self.act_fn))
        h = lora_gated_mlp(self, x, gelu)  # LoRA gate and up: one function with the gate
        if h is None:
            h = (gelu_mul if gelu else silu_mul)(self.gate_proj(x), self.up_proj(x))
        elif h.requires_grad:
            self.gated = True  # training/memory.py counts these (`gated_mlps`)
            if getattr(self, "rebuild_output", False) and not recomputing():  # (a recomputed
                # layer frees h with the rest of its activations as soon as it is done)
                with rebuilt_in_backward(h):  # the down projection keeps a recipe, not h
                    return _down(self, h)
        return _down(self, h)
    return type(self).forward(self, x)


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLPs of `model` that have taken the gated LoRA path (kernels/lora_mlp.py)."""
    return [m for m in model.modules() if getattr(m, "gated", False)]


def rebuild_gated_outputs(model: nn.Module, on: bool = True) -> int:
    """Let (or stop) the MLPs that took the gated LoRA path keep their activation h only as
    a recipe, rebuilt in backward (kernels/lora_mlp.py `rebuilt_in_backward`); returns how
    many MLPs that covers."""
    mlps = gated_mlps(model)
    for module in mlps:
        module.rebuild_output = on
    return len(mlps)


def _fused_gate_up_forward(self, x: Tensor) -> Tensor:
    """Phi-3's MLP: one gate_up projection, chunked, up · silu(gate)."""
    if kernels_enabled(x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return _down(self, silu_mul(gate, up))
    return type(self).forward(self, x)


_ORIGINAL_ROPE: dict[str, object] = {}  # module name -> transformers' apply_rotary_pos_emb


def _fast_rope_for(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **kwargs):
        dim = q.shape[-1]
        usable = unsqueeze_dim == 1 and not kwargs and q.dim() == 4 and cos.dim() == 3
        usable = usable and cos.shape[-1] == q.shape[-1] == k.shape[-1]  # no partial rotary
        if usable and kernels_enabled(q) and dim // 2 & (dim // 2 - 1) == 0 and q.stride(-1) == 1:
            return rope(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim, **kwargs)

    return apply_rotary_pos_emb


def patch_rope(model: nn.Module) -> bool:
    """Route transformers' apply_rotary_pos_emb of the model's modeling module to `rope`.

    The function is module-level in transformers, so this holds for every model of that
    architecture in the process (CPU tensors and other layouts still take the original);
    `unpatch_rope()` restores it.
    """
    import sys

    name = type(model).__module__
    module = sys.modules.get(name)
    if module is None or not hasattr(module, "apply_rotary_pos_emb") or name in _ORIGINAL_ROPE:
        return name in _ORIGINAL_ROPE
    _ORIGINAL_ROPE[name] = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = _fast_rope_for(module.apply_rotary_pos_emb)
    return True


def unpatch_rope() -> None:
    """Put transformers' own apply_rotary_pos_emb back everywhere `patch_rope` replaced it."""
    import sys

    for name, original in _ORIGINAL_ROPE.items():
        sys.modules[name].apply_rotary_pos_emb = original
    _ORIGINAL_ROPE.clear()


def patch_llama(model: nn.Module) -> int:
    """Route RMSNorm, SiLU-gated MLP modules and RoPE through the Triton kernels, mark the
    MLPs of `RESIDUAL_LAST` layers (their down projection is skipped when recomputed), and
    link the LoRA layers of q/k/v and of gate/up (kernels/lora_group.py).

    Returns how many modules now take the fast path (RoPE: see `patch_rope`).
    """
    count = 0
    for module in model.modules():
        if "Attention" in type(module).__name__ and hasattr(module, "q_proj"):
            patch_rope(module)
            break
    for module in model.modules():
        if type(module).__name__ in RESIDUAL_LAST and hasattr(module, "mlp"):
            module.mlp.feeds_residual_only = True
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            if all(hasattr(module, n) for n in names):  # LoRA layers reading one input
                link_siblings([getattr(module, n) for n in names])
    for module in model.modules():
        if type(module).__name__ in FAMILY_NORMS:
            module.forward = types.MethodType(_norm_forward, module)
            count += 1
        elif all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            if _gate_kind(module.act_fn) is not None:
                module.forward = types.MethodType(_mlp_forward, module)
                count += 1
        elif all(hasattr(module, n) for n in ("gate_up_proj", "down_proj", "activation_fn")):
            if _gate_kind(module.activation_fn) is False:
                module.forward = types.MethodType(_fused_gate_up_forward, module)
                count += 1
    return count
