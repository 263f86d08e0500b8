"""The causal language-model loss, computed only where there is something to learn.

A causal LM predicts token t+1 from the hidden state at t. The output layer
(hidden d -> vocabulary V, V = 49,152 for SmolLM2) is a large share of the compute
and most of the activation memory: full logits are (B, T, V) floats. The trainer
runs it only at the positions whose next token carries a label, and in chunks
(`fused_loss.linear_cross_entropy`, which never holds more than one chunk of logits):

    hidden (B, T, d) ──► keep positions t with labels[:, t+1] != -100 ──► h (N, d)
    loss_sum = Σ_i -log softmax(h_i W^T)[label_i]        (chunked; N ≤ B·(T-1))

With prompt/completion data N is the completion tokens only, so the output layer
costs nothing on the prompt; right padding never reaches it either.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from slimtune.kernels.cross_entropy import linear_cross_entropy
from slimtune.training.data import IGNORE_INDEX, Dataset, Example, collate, send


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(body that returns hidden states, output Linear) of a plain transformers causal LM.

    None when the model is wrapped (prompt tuning), its output layer is adapted or has
    a bias, or it scales its logits; the trainer then calls the model's own forward.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or not hasattr(model, "get_decoder"):
        return None
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    head, body = model.get_output_embeddings(), model.get_decoder()
    if type(head) is not nn.Linear or head.bias is not None or body is None or body is model:
        return None
    return body, head


def causal_lm_loss(
    model: nn.Module, batch: dict[str, Tensor], chunk: int = 1024
) -> tuple[Tensor, int]:
    """(Σ token losses, number of tokens with a loss) for a right-padded batch.

    Args:
        model: a causal LM (a transformers model, possibly with adapters injected).
        batch: input_ids, attention_mask and labels, (B, T) each; -100 marks no loss.
        chunk: positions per output-layer chunk.
    """
    labels = batch["labels"]
    host = getattr(batch, "host", batch)  # the host tensors of a moved batch (data.py)
    keep = host["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1): positions that predict a label
    count = int(keep.sum())
    mask = batch["attention_mask"]
    mask = None if bool(host["attention_mask"].all()) else mask  # no padding: causal kernel
    packed = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    mask = None if packed else mask  # packed rows: position ids mark them (packing.py)
    if count == 0:
        return torch.zeros((), device=labels.device), 0
    parts = split_model(model)
    if parts is None:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            labels=labels,
            use_cache=False,
            **packed,
        )
        return out.loss.float() * count, count
    body, head = parts
    hidden = body(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False, **packed)[0]
    hidden = hidden[:, -labels.shape[1] :]  # (B, T, d); a model may put virtual tokens first
    selected, targets = kept_rows(hidden, labels, keep)  # (N, d), (N,)
    mean = linear_cross_entropy(selected, head.weight, targets, chunk=chunk)
    return mean * count, count


def kept_rows(hidden: Tensor, labels: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """The hidden states (N, d) of the positions `keep` (B, T-1) marks, and the labels
    (N,) they predict (the next position's), in row-major order.

    With `keep` on the host and `hidden` on a GPU the rows are gathered by an index built on
    the host: a boolean index on the GPU would wait for the whole forward pass to finish.
    """
    if keep.device == hidden.device:
        return hidden[:, :-1][keep], labels[:, 1:][keep]
    return rows_by_host_index(hidden, labels, keep)


def rows_by_host_index(hidden: Tensor, labels: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """`kept_rows` with the positions' index built from `keep` where it lies (the host)."""
    width = labels.shape[1]
    rows, cols = keep.nonzero(as_tuple=True)
    index = send(rows * width + cols, hidden.device)  # rows of the (B·T, d) view
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat.index_select(0, index), labels.reshape(-1).index_select(0, index + 1)


@torch.no_grad()
def dataset_loss(
    model: nn.Module,
    data: Dataset | list[Example],
    batch_size: int = 8,
    autocast: torch.dtype | None = None,
    chunk: int = 1024,
) -> float:
    """Mean loss per label token over every example (batched by length, no shuffling)."""
    examples = data.examples if isinstance(data, Dataset) else data
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id=0)
        batch = {k: v.to(device) for k, v in batch.items()}
        ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            loss_sum, n = causal_lm_loss(model, batch, chunk)
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    return total / max(count, 1)
