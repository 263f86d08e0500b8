"""`--method full`: every parameter trains; the baseline every other method is compared with.
RUN/adapter is then a full transformers directory (the table's row says saves="model")."""

from __future__ import annotations

from typing import Any

from torch import nn


def prepare_full(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(True)
    return model
