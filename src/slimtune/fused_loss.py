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

Peak extra memory: one (C, V) chunk in fp32 instead of (T, V); backward only scales
the stored gradients by the incoming one.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def _chunk_rows(vocab: int, budget: int = 1 << 26) -> int:
    """Rows per chunk so that one fp32 chunk of logits holds about `budget` values."""
    return max(64, budget // max(vocab, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk: int):
        h = hidden.reshape(-1, hidden.shape[-1])  # (T, d)
        y = labels.reshape(-1)  # (T,)
        valid = y != ignore_index
        n = valid.sum().clamp(min=1).to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start : start + chunk], y[start : start + chunk]  # (C, d), (C,)
            vc = valid[start : start + chunk]
            z = torch.mm(hc, weight.t().to(hc.dtype)).float()  # (C, V)
            lse = torch.logsumexp(z, dim=-1)  # (C,)
            target = z.gather(1, yc.clamp(min=0).unsqueeze(1)).squeeze(1)  # (C,)
            total += ((lse - target) * vc).sum()
            if dh is None and dw is None:
                continue
            z.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
            z.scatter_add_(1, yc.clamp(min=0).unsqueeze(1), -torch.ones_like(lse).unsqueeze(1))
            z.mul_((vc.float() / n).unsqueeze(1))  # (C, V): ∂loss/∂z
            gz = z.to(h.dtype)
            if dh is not None:
                dh[start : start + chunk] = torch.mm(gz, weight.to(h.dtype))
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
