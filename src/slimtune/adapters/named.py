"""Named adapters on a model: which it carries, which is active, and what works on all of them.

    adapter_configs(model) -> {name: config}      active_adapter(model) -> name
    set_adapter / delete_adapter / disable_adapter      switch, drop, bypass
    merge / unmerge / merge_and_unload / unload          W = W0 + s·B·A and back

Everything here works through the `AdapterLayer` / `MergeableLayer` protocols
(slimtune.adapters.layers) and never needs to know which method built the layers.
Adding an adapter goes through the method table (slimtune.methods.table.add_adapter),
which calls `record_adapter` here once the method has built its layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from slimtune.adapters.layers import (
    MergeableLayer,
    adapter_layers,
    is_adapter_layer,
    is_mergeable,
    replace_module,
)
from slimtune.errors import SlimtuneError

_CONFIGS_ATTR = "_slimtune_adapters"  # model attribute: {adapter name: config}
_ACTIVE_ATTR = "_slimtune_active"  # model attribute: name of the active adapter


def check_new_name(model: nn.Module, adapter_name: str) -> None:
    """Refuse an empty name, a name with '.', or one the model already carries."""
    if not adapter_name or "." in adapter_name:
        raise SlimtuneError(
            f"adapter name {adapter_name!r} is not accepted: a non-empty name without '.'"
        )
    if adapter_name in adapter_configs(model):
        raise SlimtuneError(f"the model already has an adapter named {adapter_name!r}")


def record_adapter(model: nn.Module, adapter_name: str, config: Any) -> None:
    """Remember `config` under `adapter_name`; the first adapter becomes active, and only the
    active one trains (as in PEFT)."""
    first = not adapter_configs(model)
    configs = dict(adapter_configs(model))
    configs[adapter_name] = config
    model.__dict__[_CONFIGS_ATTR] = configs
    if first:
        model.__dict__[_ACTIVE_ATTR] = adapter_name
    for layer in adapter_layers(model):
        layer.set_adapter([active_adapter(model)])


def adapter_configs(model: nn.Module) -> dict[str, Any]:
    """{adapter name: config} of every adapter the model carries (a copy)."""
    return dict(model.__dict__.get(_CONFIGS_ATTR, {}))


def active_adapter(model: nn.Module) -> str | None:
    """Name of the active adapter, None when the model carries none."""
    return model.__dict__.get(_ACTIVE_ATTR)


# ----------------------------------------------------------------------------- named adapters


def _check_name(model: nn.Module, adapter_name: str) -> None:
    names = adapter_configs(model)
    if adapter_name not in names:
        raise SlimtuneError(
            f"no adapter named {adapter_name!r}; the model has: {', '.join(names) or 'none'}"
        )


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make `adapter_name` the active (and only trainable) adapter."""
    _check_name(model, adapter_name)
    for layer in adapter_layers(model):
        layer.set_adapter([adapter_name])
    model.__dict__[_ACTIVE_ATTR] = adapter_name
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove an adapter; if it was active, the first remaining one becomes active."""
    _check_name(model, adapter_name)
    configs = adapter_configs(model)
    del configs[adapter_name]
    for layer in adapter_layers(model):
        layer.delete_adapter(adapter_name)
    model.__dict__[_CONFIGS_ATTR] = configs
    if active_adapter(model) == adapter_name:
        model.__dict__[_ACTIVE_ATTR] = next(iter(configs), None)
        if configs:
            set_adapter(model, next(iter(configs)))
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base model (adapters bypassed)."""
    layers = list(adapter_layers(model))
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as PEFT's get_nb_trainable_parameters.

    A frozen quantized linear layer counts in_features × out_features for its packed
    weight (as PEFT counts a 4-bit weight), not the bytes it stores.
    """
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    for module in model.modules():
        if hasattr(module, "dequantize_weight") and not isinstance(
            getattr(module, "weight", None), nn.Parameter
        ):
            total += module.in_features * module.out_features
    return trainable, total


# ----------------------------------------------------------------------------- merging


def _mergeable(model: nn.Module) -> list[tuple[str, MergeableLayer]]:
    layers = [(n, m) for n, m in model.named_modules() if is_mergeable(m) and m is not model]
    unmergeable = [
        n or type(m).__name__
        for n, m in model.named_modules()
        if is_adapter_layer(m) and not is_mergeable(m)
    ]
    if unmergeable:
        raise SlimtuneError(
            f"the adapter in {unmergeable[0]} cannot be merged into the base weights"
        )
    return layers


def merge(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Fold the active adapter (or `adapter_names`) into the base weights, W = W0 + s·B·A."""
    names = adapter_names or [active_adapter(model)]
    for name in names:
        _check_name(model, name)
    layers = _mergeable(model)
    _untie(model, [layer for _, layer in layers])
    for _, layer in layers:
        layer.merge(names)
    return model


def _untie(model: nn.Module, layers: list[nn.Module]) -> None:
    """Give modules that share a weight with an adapter's base layer (a tied output head)
    their own copy, so merging changes only the adapted module, as unmerged it computes."""
    owned = {
        id(p): layer for layer in layers for p in getattr(layer, "base_layer", layer).parameters()
    }
    for module in model.modules():
        for attr, param in list(module._parameters.items()):
            owner = owned.get(id(param))
            if owner is None or any(module is m for m in owner.modules()):
                continue
            setattr(
                module,
                attr,
                nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad),
            )
            if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
                model.config.tie_word_embeddings = False


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter again (W0 back to within fp32 rounding)."""
    layers = _mergeable(model)
    if not any(getattr(layer, "merged_adapters", None) for _, layer in layers):
        raise SlimtuneError("nothing is merged: unmerge follows a merge")
    for _, layer in layers:
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Merge and replace every adapter layer by its plain base module; returns the plain model."""
    if active_adapter(model) is None:
        raise SlimtuneError("the model carries no adapter to merge")
    merge(model, adapter_names)
    for name, layer in _mergeable(model):
        replace_module(model, name, layer.unload())
    model.__dict__.pop(_CONFIGS_ATTR, None)
    model.__dict__.pop(_ACTIVE_ATTR, None)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging; returns the base model."""
    for name, layer in _mergeable(model):
        layer.unmerge()
        replace_module(model, name, layer.unload())
    model.__dict__.pop(_CONFIGS_ATTR, None)
    model.__dict__.pop(_ACTIVE_ATTR, None)
    return model
