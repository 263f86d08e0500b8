"""Bottleneck adapters: Houlsby et al. 2019, "Parameter-Efficient Transfer Learning
for NLP", arXiv:1902.00751.

A small two-layer network with a skip connection is inserted on the output of the
attention block and of the MLP block of every transformer layer, before that
block's residual add:

    x ─► sub-layer (frozen: attention or MLP) ─► h ─┬──────────────────────────► (+) ─► h'
                                                    └─► W_down (m×d) ─► f ─► W_up (d×m) ┘

    h' = h + W_up f(W_down h + b_down) + b_up,        then  x + h'  (the block's residual)

W_up and b_up start at zero, so training starts exactly at the base model. A layer
adds 2·d·m + m + d parameters; unlike LoRA the adapter cannot be folded into a
weight matrix, so it adds inference latency (the comparison report measures it).

Where "the output of the attention and MLP block" is, per model family:
  Llama, Qwen2, Mistral, …  `self_attn`, `mlp`       (their output; residual added by the layer)
  GPT-2                     `attn`, `mlp`
  BERT, RoBERTa             `output.dense`           (attention.output.dense and output.dense:
                                                     the projections before add & LayerNorm)

File format (slimtune's own; PEFT has no bottleneck adapters):
  adapter_config.json        {"peft_type": "BOTTLENECK", "bottleneck_size": m,
                              "non_linearity": "relu", "target_modules": [...], ...}
  adapter_model.safetensors  base_model.model.<sub-layer>.adapter_down.weight (m, d),
                             ….adapter_down.bias (m), ….adapter_up.weight (d, m), ….adapter_up.bias (d)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.adapters.layers import SingleActiveAdapter
from slimtune.config import BottleneckConfig
from slimtune.errors import SlimtuneError

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}

# model type -> the sub-layers whose output gets an adapter
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "gemma2", "phi3"],
        ["self_attn", "mlp"],
    ),
    "gpt2": ["attn", "mlp"],
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], ["output.dense"]),
}
PREFIX = "base_model.model."


def bottleneck(
    h: Tensor,
    w_down: Tensor,
    b_down: Tensor,
    w_up: Tensor,
    b_up: Tensor,
    activation: Callable[[Tensor], Tensor] = F.relu,
) -> Tensor:
    """h + W_up f(W_down h + b_down) + b_up, on the last dimension of h (…, d)."""
    z = activation(F.linear(h, w_down, b_down))  # (…, m)
    return h + F.linear(z, w_up, b_up)  # (…, d)


class BottleneckAdapter(nn.Module):
    """The parameters of one adapter: d -> m -> d, up projection zero-initialised."""

    def __init__(self, d: int, m: int, non_linearity: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(d, m)
        self.adapter_up = nn.Linear(m, d)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.non_linearity = non_linearity
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        down, up = self.adapter_down, self.adapter_up
        x = self.dropout(h).to(down.weight.dtype)
        z = ACTIVATIONS[self.non_linearity](F.linear(x, down.weight, down.bias))  # (…, m)
        return h + F.linear(z, up.weight, up.bias).to(h.dtype)  # (…, d)


class BottleneckLayer(SingleActiveAdapter, nn.Module):
    """A sub-layer followed by named bottleneck adapters (one active at a time)."""

    adapter_store = "adapters"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.enabled = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if not self.enabled or self.active not in self.adapters:
            return out
        adapter = self.adapters[self.active]
        if isinstance(out, tuple):  # attention blocks return (output, weights, …)
            return (adapter(out[0]), *out[1:])
        return adapter(out)


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise SlimtuneError(
            f"bottleneck adapters: no default sub-layers for model type {model_type!r}; give "
            f"target_modules (known: {', '.join(sorted(DEFAULT_TARGETS))})"
        )
    return DEFAULT_TARGETS[model_type]


def _width(model: nn.Module, module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return model.config.hidden_size


def _targets(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """Names of the targeted sub-layers (an already wrapped one counts under its own name)."""
    from slimtune.adapters.targets import is_target

    names = [
        name
        for name, module in model.named_modules()
        if name and is_target(config, name, config.target_modules) and ".adapters." not in name
    ]
    if not names:
        raise SlimtuneError(
            f"bottleneck adapters: target_modules={config.target_modules!r} matches no module"
        )
    return names


def add_bottleneck(model: nn.Module, config: BottleneckConfig, adapter_name: str) -> nn.Module:
    """Insert a bottleneck adapter after every targeted sub-layer (in place); returns the model."""
    from slimtune.adapters.layers import freeze_all, replace_module

    if config.target_modules is None:
        config = replace(config, target_modules=default_targets(model))
    if not bottleneck_layers(model):
        freeze_all(model)
    for name in _targets(model, config):
        layer = model.get_submodule(name)
        if not isinstance(layer, BottleneckLayer):
            layer = BottleneckLayer(layer)
            replace_module(model, name, layer)
        d = _width(model, layer.base_layer)
        adapter = BottleneckAdapter(
            d, config.bottleneck_size, config.non_linearity, config.adapter_dropout
        )
        adapter.to(next(layer.base_layer.parameters()).device).requires_grad_(False)
        layer.adapters[adapter_name] = adapter
    return model


def bottleneck_layers(model: nn.Module) -> dict[str, BottleneckLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckLayer)}


def export_bottleneck(model: nn.Module, adapter_name: str, config: BottleneckConfig):
    """(tensors, adapter_config.json fields, metadata) of one bottleneck adapter."""
    tensors: dict[str, Tensor] = {}
    targets = []
    for name, layer in bottleneck_layers(model).items():
        if adapter_name not in layer.adapters:
            continue
        targets.append(name.rpartition(".")[2])
        for key, value in layer.adapters[adapter_name].state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = value
    config_fields = {
        "format": "slimtune",
        "bottleneck_size": config.bottleneck_size,
        "non_linearity": config.non_linearity,
        "adapter_dropout": config.adapter_dropout,
        "target_modules": config.target_modules or sorted(set(targets)),
        "task_type": config.task_type,
    }
    return tensors, config_fields, {}


def load_bottleneck(model: nn.Module, adapter_name: str, config_json, tensors, metadata):
    """Add a bottleneck adapter read from its files; every stored tensor must find its place."""
    from slimtune.adapters.peft_keys import copy_adapter_tensors
    from slimtune.methods.table import add_adapter

    names = {f.name for f in fields(BottleneckConfig)}
    config = BottleneckConfig(**{k: v for k, v in config_json.items() if k in names})
    model = add_adapter(model, config, adapter_name)
    expected: dict[str, Tensor] = {}
    for name, layer in bottleneck_layers(model).items():
        if adapter_name in layer.adapters:
            for key, value in layer.adapters[adapter_name].state_dict().items():
                expected[f"{PREFIX}{name}.{key}"] = value
    copy_adapter_tensors(expected, tensors, "bottleneck adapter file")
    return model


def prepare_bottleneck(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """`--method adapter`: width --bottleneck-size after attention and MLP."""
    from slimtune.methods.options import parse_targets
    from slimtune.methods.table import add_adapter

    targets = parse_targets(options.get("target_modules"))
    size = options.get("bottleneck_size")
    config = BottleneckConfig(
        bottleneck_size=64 if size is None else size,
        target_modules=None if targets == "all-linear" else targets,
    )
    return add_adapter(model, config)
