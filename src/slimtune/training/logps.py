"""Per-token and per-sequence log-probabilities of a batch, as the preference losses need them.

A causal LM gives log π(x_{t+1} | x_≤t) at every position t. Preference objectives need,
for each row, the sum over the answer's tokens (the positions whose label is not -100):

    hidden (B, T, d) ──► keep positions t with keep[:, t] ──► h (N, d)
    logp_i = (h_i Wᵀ)[y_i] - logsumexp(h_i Wᵀ)             (chunks of rows, fp32 softmax)
    logps[b] = Σ_{t: labels[b, t+1] != -100} logp(b, t)

As in the SFT loss (loss.py), the output layer runs only at the kept positions, in chunks;
each chunk is recomputed in the backward pass instead of keeping its (C, V) logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from slimtune.training.data import IGNORE_INDEX
from slimtune.training.loss import split_model


def _chunk_logps(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """log softmax(h Wᵀ)[y] for a chunk of rows, (C,) in fp32."""
    logits = (hidden @ weight.to(hidden.dtype).t()).float()  # (C, V)
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.logsumexp(dim=-1)


def token_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, keep: Tensor, chunk: int = 1024
) -> Tensor:
    """log π(x_{t+1} | x_≤t) where keep[:, t], else 0: a (B, T-1) fp32 tensor.

    Args:
        model: a causal LM (a transformers model, possibly with adapters injected).
        input_ids, attention_mask: a right-padded batch, (B, T).
        keep: (B, T-1) bool, the positions whose next token is scored.
        chunk: rows of the output layer computed at a time.
    """
    width = input_ids.shape[1]
    mask = None if bool(attention_mask.all()) else attention_mask
    targets = input_ids[:, 1:][keep]  # (N,)
    parts = split_model(model)
    if parts is None:  # a wrapped model (soft prompt) or an adapted / scaled output layer
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        selected = logits[:, -width:][:, :-1][keep].float()  # (N, V)
        picked = selected.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    else:
        body, head = parts
        hidden = body(input_ids=input_ids, attention_mask=mask, use_cache=False)[0]
        selected = hidden[:, -width:][:, :-1][keep]  # (N, d)
        pieces = [
            checkpoint(
                _chunk_logps,
                selected[start : start + chunk],
                head.weight,
                targets[start : start + chunk],
                use_reentrant=False,
            )
            for start in range(0, selected.shape[0], chunk)
        ]
        picked = torch.cat(pieces) if pieces else selected.new_zeros(0, dtype=torch.float32)
    dense = torch.zeros(keep.shape, dtype=torch.float32, device=input_ids.device)
    return dense.masked_scatter(keep, picked)  # (B, T-1)


def answer_mask(labels: Tensor) -> Tensor:
    """(B, T-1) bool: the positions t whose next token is part of the answer (has a label)."""
    return labels[:, 1:] != IGNORE_INDEX


def sequence_logps(model: nn.Module, batch: dict[str, Tensor], chunk: int = 1024) -> Tensor:
    """Σ log π over each row's answer tokens, (B,) in fp32."""
    keep = answer_mask(batch["labels"])
    return token_logps(model, batch["input_ids"], batch["attention_mask"], keep, chunk).sum(dim=1)
