"""Linear + cross-entropy in chunks: the loss of a causal LM without its full logits.

A 128k-token vocabulary makes the logits of a 4 × 2048 batch 1.0 billion values
(2 GiB in bf16, 4 GiB once upcast for the softmax). The loss and its gradient need only
one chunk of rows at a time, so the forward pass computes the gradient as well and
keeps just that (the same idea as liger-kernel's fused linear cross-entropy, in PyTorch):

    for each chunk c of rows:   z = h_c Wᵀ                      (C, V) in the model dtype
                                ℓ_i = logsumexp(z_i) - z_i[y_i]   (fp32)
                                ∂ℓ/∂z = (softmax(z) - onehot(y)) / N
                                ∂ℓ/∂h_c = (∂ℓ/∂z) W,   ∂ℓ/∂W += (∂ℓ/∂z)ᵀ h_c

    loss = Σ_i ℓ_i / N over the N rows whose label is not ignore_index (mean, as HF).

Peak extra memory: one (C, V) chunk instead of (T, V); backward only scales the stored
gradients by the incoming one. On CUDA one Triton kernel per chunk computes each row's
log-sum-exp (online, in fp32) and overwrites the bf16 logits with their gradient, so no
fp32 copy of the chunk is made; `chunk_loss_grad` is its PyTorch reference twin.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimtune.quant.triton import _interpreted, kernels_enabled, triton

IGNORE_INDEX = -100


def _chunk_rows(vocab: int, budget: int = 1 << 26) -> int:
    """Rows per chunk so that one fp32 chunk of logits holds about `budget` values."""
    return max(64, budget // max(vocab, 1))


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _ce_rows_kernel(
        z_ptr, y_ptr, scale_ptr, loss_ptr, vocab: tl.constexpr, BLOCK: tl.constexpr
    ):
        """One row of logits: loss = lse - z[y]; z is overwritten by (softmax - onehot) · scale."""
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * vocab
        m = tl.full([BLOCK], -1e30, tl.float32)  # running max per lane
        acc = tl.full([BLOCK], 0.0, tl.float32)  # running Σ exp(z - m) per lane
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            z = tl.load(base + cols, mask=mask, other=-1e30).to(tl.float32)
            m_new = tl.maximum(m, z)
            acc = acc * tl.exp(m - m_new) + tl.where(mask, tl.exp(z - m_new), 0.0)
            m = m_new
        # tl.reduce with the standard combiners (tl.max/tl.sum are @jit helpers that Triton's
        # interpreter only runs when TRITON_INTERPRET was set before triton was imported)
        row_max = tl.reduce(m, 0, tl.standard._elementwise_max)
        lse = row_max + tl.log(tl.reduce(acc * tl.exp(m - row_max), 0, tl.standard._sum_combine))
        y = tl.load(y_ptr + row)
        scale = tl.load(scale_ptr + row)
        target = tl.full([BLOCK], 0.0, tl.float32)  # z[y], picked up on the second pass
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            hit = cols == y
            target += tl.where(hit, z, 0.0)
            g = (tl.exp(z - lse) - tl.where(hit, 1.0, 0.0)) * scale
            tl.store(base + cols, g.to(z_ptr.dtype.element_ty), mask=mask)
        tl.store(loss_ptr + row, lse - tl.reduce(target, 0, tl.standard._sum_combine))


def chunk_loss_grad(z: Tensor, y: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row loss (fp32) and ∂/∂z = (softmax(z) - onehot(y)) · scale, in z's dtype.

    The reference twin of the Triton kernel (which does the same in place, in one launch).
    """
    zf = z.float()  # (C, V)
    lse = torch.logsumexp(zf, dim=-1)  # (C,)
    loss = lse - zf.gather(1, y.unsqueeze(1)).squeeze(1)
    zf.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
    zf.scatter_add_(1, y.unsqueeze(1), -torch.ones_like(lse).unsqueeze(1))
    return loss, zf.mul_(scale.unsqueeze(1)).to(z.dtype)


def _chunk_loss_grad_triton(z: Tensor, y: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    rows, vocab = z.shape
    z = z.contiguous()
    loss = torch.empty(rows, dtype=torch.float32, device=z.device)
    if z.device.type == "cpu":
        kernel, extra = _interpreted(_ce_rows_kernel), {}
    else:
        kernel, extra = _ce_rows_kernel, {"num_warps": 8}
    kernel[(rows,)](z, y.contiguous(), scale.contiguous(), loss, vocab, BLOCK=2048, **extra)
    return loss, z


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk: int):
        h = hidden.reshape(-1, hidden.shape[-1])  # (T, d)
        y = labels.reshape(-1)  # (T,)
        valid = y != ignore_index
        n = valid.sum().clamp(min=1).to(torch.float32)
        scale = valid.float() / n  # (T,) weight of each row in the mean
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        w = weight.to(h.dtype)
        rows_fn = _chunk_loss_grad_triton if kernels_enabled(h) else chunk_loss_grad
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start : start + chunk], y[start : start + chunk].clamp(min=0)
            z = torch.mm(hc, w.t())  # (C, V), the model's dtype as transformers computes it
            loss, gz = rows_fn(z, yc, scale[start : start + chunk])
            total += (loss * valid[start : start + chunk]).sum()
            if dh is not None:
                dh[start : start + chunk] = torch.mm(gz, w)
            if dw is not None:
                dw.addmm_(gz.t().float(), hc.float())
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype, ctx.hidden_shape = weight.dtype, hidden.shape
        return total / n

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        dhidden = (dh * grad.to(dh.dtype)).view(ctx.hidden_shape) if dh is not None else None
        dweight = (dw * grad).to(ctx.weight_dtype) if dw is not None else None
        return dhidden, dweight, None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk: int | None = None,
) -> Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels`, never building all logits.

    Args:
        hidden: (..., d) final hidden states (already normed).
        weight: (V, d) output projection (lm_head), frozen or trainable.
        labels: (...) target ids, `ignore_index` where no loss is taken.
        chunk: rows per chunk (default: about 64M logits per chunk).
    """
    return _LinearCrossEntropy.apply(
        hidden, weight, labels, ignore_index, chunk or _chunk_rows(weight.shape[0])
    )


def causal_lm_loss(model: torch.nn.Module, input_ids: Tensor, labels: Tensor, **kwargs) -> Tensor:
    """Next-token loss of a transformers causal LM, as HF computes it, without full logits.

    Runs the decoder (`model.model`), shifts the labels by one and applies the
    chunked linear cross-entropy with `model.lm_head`.
    """
    kwargs.setdefault("use_cache", False)  # a training step needs no KV cache
    hidden = model.model(input_ids=input_ids, **kwargs).last_hidden_state  # (B, T, d)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    return linear_cross_entropy(hidden, model.lm_head.weight, shifted)
