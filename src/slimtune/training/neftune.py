"""NEFTune: uniform noise on the input embeddings while training.

Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning",
arXiv:2310.05914. During training only, each embedding output X (B, L, d) becomes

    X + ε,   ε ~ Uniform(-m, m) elementwise,   m = α / √(L · d)

with L the (padded or packed) sequence length, as transformers' `neftune_post_forward_hook`
computes it, so the same seed draws the same noise. Evaluation and generation run the
module in eval mode and see no noise; the trainer removes the hook when it finishes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def neftune_noise(output: Tensor, alpha: float) -> Tensor:
    """ε for an embedding output (B, L, d): Uniform(-m, m), m = α / √(L·d)."""
    dims = torch.tensor(output.size(1) * output.size(2), dtype=torch.float32)
    magnitude = float(alpha / torch.sqrt(dims))  # in float32, as transformers computes it
    return torch.zeros_like(output).uniform_(-magnitude, magnitude)  # (B, L, d)


def add_neftune(model: nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Hook NEFTune noise onto the model's input embeddings (active in train mode only)."""
    embeddings = model.get_input_embeddings()

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output + neftune_noise(output, alpha) if module.training else output

    return embeddings.register_forward_hook(hook)


@contextmanager
def neftune(model: nn.Module, alpha: float) -> Iterator[None]:
    """NEFTune noise while the block runs (alpha 0: none); the hook is gone afterwards."""
    handle = add_neftune(model, alpha) if alpha else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
