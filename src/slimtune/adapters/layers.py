"""The pieces every method builds on: what an adapter layer is, putting one in place of a module,
freezing, and PEFT's `modules_to_save` (a module trained in full beside its frozen original).

Modules that carry named adapters implement `AdapterLayer` (set_adapter, delete_adapter,
enable_adapters); those that can merge also implement `MergeableLayer` (merge, unmerge,
unload, merged_adapters). `slimtune.adapters.named` then manages them without knowing the method.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from torch import nn
from torch.nn import ModuleDict

from slimtune.errors import SlimtuneError


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


# ----------------------------------------------------------------------------- modules_to_save


class SingleActiveAdapter:
    """set_adapter / delete_adapter / enable_adapters for a layer that keeps its adapters in one
    ModuleDict or ParameterDict, named by `adapter_store`, with one adapter active at a time."""

    adapter_store: str  # the attribute holding {adapter name: module or parameter}
    active: str | None
    enabled: bool

    def set_adapter(self, names: list[str]) -> None:
        store = getattr(self, self.adapter_store)
        self.active = next((n for n in names if n in store), None)
        for name, item in store.items():
            item.requires_grad_(name == self.active)

    def delete_adapter(self, name: str) -> None:
        store = getattr(self, self.adapter_store)
        if name in store:
            del store[name]
            self.active = None if self.active == name else self.active

    def enable_adapters(self, enabled: bool) -> None:
        self.enabled = enabled


class ModulesToSaveWrapper(SingleActiveAdapter, nn.Module):
    """A module trained in full: a trainable copy per adapter beside the frozen original.

    Same structure and key names as PEFT's ModulesToSaveWrapper: `original_module` and
    `modules_to_save.<adapter>`; saved without the wrapper path (`classifier.weight`).
    """

    adapter_store = "modules_to_save"

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
    if not all(isinstance(target, str) and target for target in module_names):
        raise SlimtuneError(f"modules_to_save={module_names!r}: give non-empty module names")
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
