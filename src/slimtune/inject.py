"""Putting adapters into a model: in-place replacement, freezing, named adapters, merging.

    model ──► match names (targets.py: PEFT's target_modules rules)
          ──► replace each match by an adapter layer that wraps it as `base_layer`
          ──► freeze everything except the active adapter (and `modules_to_save`)

Plugging in a method (prompt tuning, bottleneck adapters, IA3, DoRA …), see registry.py:

    register_method(MyConfig, add_fn)             # add_fn(model, config, name) -> model
    register_method(LoraConfig, add_dora, variant="use_dora")  # when config.use_dora is true
    register_format(AdapterFormat("PROMPT_TUNING", MyConfig, export_fn, load_fn))  # files

`add_adapter(model, config, name)` dispatches on the config's type (and variant), records
the config on the model (`adapter_configs(model) -> {name: config}`) and returns the model.
Modules that carry named adapters implement `AdapterLayer` (set_adapter, delete_adapter,
enable_adapters); those that can merge also implement `MergeableLayer` (merge, unmerge,
unload, merged_adapters). Then `set_adapter`, `delete_adapter`, `disable_adapter`, `merge`,
`unmerge` and `merge_and_unload` below work on them without knowing the method. Helpers
for methods: `find_targets`, `replace_module`, `freeze_all`, `wrap_modules_to_save`,
`config_from_json` (all importable from here).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from torch import nn
from torch.nn import ModuleDict

from slimtune.errors import SlimtuneError
from slimtune.registry import (  # noqa: F401  (re-exported: methods register through inject)
    PEFT_PREFIX,
    AdapterFormat,
    config_from_json,
    copy_adapter_tensors,
    format_for_config,
    format_for_json,
    lookup_method,
    register_format,
    register_method,
)
from slimtune.targets import DEFAULT_TARGET_MODULES, find_targets, is_target, resolve_targets  # noqa: F401

_CONFIGS_ATTR = "_slimtune_adapters"  # model attribute: {adapter name: config}
_ACTIVE_ATTR = "_slimtune_active"  # model attribute: name of the active adapter


@runtime_checkable
class AdapterLayer(Protocol):
    """A module that carries named adapters."""

    def set_adapter(
        self, names: list[str]
    ) -> None: ...  # activate these (trainable), freeze others

    def delete_adapter(self, name: str) -> None: ...

    def enable_adapters(self, enabled: bool) -> None: ...  # False: behave as the base module


@runtime_checkable
class MergeableLayer(Protocol):
    """An adapter layer whose adapters can be folded into its base weight."""

    def merge(self, names: list[str]) -> None: ...

    def unmerge(self) -> None: ...

    def unload(self) -> nn.Module: ...  # the module that replaces this layer (merged or not)


# ----------------------------------------------------------------------------- registry


def add_adapter(model: nn.Module, config: Any, adapter_name: str = "default") -> nn.Module:
    """Add an adapter described by `config` to `model` (in place) and return the model.

    The first adapter becomes active and trainable and everything else is frozen; a
    later adapter is added inactive (and frozen) until `set_adapter` picks it, as in PEFT.
    """
    if not adapter_name or "." in adapter_name:
        raise SlimtuneError(
            f"adapter name {adapter_name!r} is not accepted: a non-empty name without '.'"
        )
    if adapter_name in adapter_configs(model):
        raise SlimtuneError(f"the model already has an adapter named {adapter_name!r}")
    add_fn = lookup_method(config)
    first = not adapter_configs(model)
    model = add_fn(model, config, adapter_name)
    configs = dict(adapter_configs(model))
    configs[adapter_name] = config
    model.__dict__[_CONFIGS_ATTR] = configs
    if first:
        model.__dict__[_ACTIVE_ATTR] = adapter_name
    for layer in adapter_layers(model):
        layer.set_adapter([active_adapter(model)])
    return model


def adapter_configs(model: nn.Module) -> dict[str, Any]:
    """{adapter name: config} of every adapter the model carries (a copy)."""
    return dict(model.__dict__.get(_CONFIGS_ATTR, {}))


def active_adapter(model: nn.Module) -> str | None:
    """Name of the active adapter, None when the model carries none."""
    return model.__dict__.get(_ACTIVE_ATTR)


def is_adapter_layer(module: nn.Module) -> bool:
    """True for a module implementing AdapterLayer (transformers models, whose PEFT mixin
    has set_adapter & co. too, are never adapter layers here)."""
    from_transformers = type(module).__module__.startswith("transformers.")
    return isinstance(module, AdapterLayer) and not from_transformers


def is_mergeable(module: nn.Module) -> bool:
    return is_adapter_layer(module) and isinstance(module, MergeableLayer)


def adapter_layers(model: nn.Module) -> Iterator[AdapterLayer]:
    for module in model.modules():
        if module is not model and is_adapter_layer(module):
            yield module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is (e.g. "model.layers.0.self_attn.q_proj")."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze_all(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


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


# ----------------------------------------------------------------------------- modules_to_save


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full: a trainable copy per adapter beside the frozen original.

    Same structure and key names as PEFT's ModulesToSaveWrapper: `original_module` and
    `modules_to_save.<adapter>`; saved without the wrapper path (`classifier.weight`).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.enabled = True
        self.merged = False  # after merge, unload() hands back the trained copy

    def add(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled or self.active is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active](*args, **kwargs)

    def set_adapter(self, names: list[str]) -> None:
        self.active = next((n for n in names if n in self.modules_to_save), None)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == self.active)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
            self.active = None if self.active == name else self.active

    def enable_adapters(self, enabled: bool) -> None:
        self.enabled = enabled

    def merge(self, names: list[str]) -> None:
        """Nothing to fold: the trained copy replaces the original on unload."""
        self.merged = self.active is not None

    def unmerge(self) -> None:
        self.merged = False

    @property
    def merged_adapters(self) -> list[str]:
        return [self.active] if self.merged and self.active else []

    def unload(self) -> nn.Module:
        return self.modules_to_save[self.active] if self.merged else self.original_module


def wrap_modules_to_save(
    model: nn.Module, module_names: list[str] | None, adapter_name: str
) -> None:
    """Wrap every module whose name ends with an entry of `module_names` (PEFT's _set_trainable)."""
    if not module_names:
        return
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or not any(name.endswith(target) for target in module_names):
            continue
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, ModulesToSaveWrapper):
            module.add(adapter_name)
        elif not isinstance(parent, ModuleDict | ModulesToSaveWrapper) and not isinstance(
            module, AdapterLayer
        ):
            wrapper = ModulesToSaveWrapper(module)
            wrapper.add(adapter_name)
            replace_module(model, name, wrapper)


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


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str | None = None,
) -> nn.Module:
    """A new LoRA adapter combining others, as PEFT's (see lora_inject.add_weighted_adapter)."""
    from slimtune.lora_inject import add_weighted_adapter as combine

    return combine(model, adapters, weights, adapter_name, combination_type)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging; returns the base model."""
    for name, layer in _mergeable(model):
        layer.unmerge()
        replace_module(model, name, layer.unload())
    model.__dict__.pop(_CONFIGS_ATTR, None)
    model.__dict__.pop(_ACTIVE_ATTR, None)
    return model
