"""Putting adapters into a model: target matching, in-place replacement, freezing, named adapters.

    model ──► match names (target_modules, layers_to_transform, exclude_modules)
          ──► replace each match by an adapter layer that wraps it as `base_layer`
          ──► freeze everything except the active adapter (and `modules_to_save`)

Matching follows Hugging Face PEFT exactly (peft/tuners/tuners_utils.py), so a config
selects the same modules in both libraries:
  * a list: a module is a target when its full name equals an entry or ends with
    "." + entry;  a string: a full regex match on the full name;  "all-linear": every
    nn.Linear / Conv1D except the output head;  None: the model type's default list.
  * `layers_to_transform` keeps only modules whose first numbered segment (after
    `layers_pattern`, when given) is one of the listed indices.

Plugging in a method (prompt tuning, bottleneck adapters, IA3, DoRA …):

    register_method(MyConfig, add_fn)             # add_fn(model, config, name) -> model
    register_method(LoraConfig, add_dora, variant="use_dora")  # when config.use_dora is true

    register_format(AdapterFormat("PROMPT_TUNING", MyConfig, export_fn, load_fn))  # files

`add_adapter(model, config, name)` dispatches on the config's type (and variant), records
the config on the model (`adapter_configs(model) -> {name: config}`) and returns the model.
Modules that carry named adapters implement `AdapterLayer` (set_adapter, delete_adapter,
enable_adapters); those that can merge also implement `MergeableLayer` (merge, unmerge,
unload). Then `set_adapter`, `delete_adapter`, `disable_adapter`, `merge`, `unmerge` and
`merge_and_unload` below work on them without knowing the method. Helpers for methods:
`find_targets`, `replace_module`, `freeze_all`, `wrap_modules_to_save`, `config_from_json`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn
from torch.nn import ModuleDict

from slimtune.errors import SlimtuneError

AddFn = Callable[[nn.Module, Any, str], nn.Module]
_METHODS: dict[tuple[type, str | None], AddFn] = {}
# modules that register methods when imported; loaded on the first lookup that misses
PLUGIN_MODULES = (
    "slimtune.lora_inject",
    "slimtune.lora_format",
    "slimtune.prompt",
    "slimtune.bottleneck",
    "slimtune.dora",
    "slimtune.ia3",
)
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


def register_method(config_type: type, add_fn: AddFn, *, variant: str | None = None) -> None:
    """Make `add_adapter` call `add_fn(model, config, name)` for configs of `config_type`.

    Args:
        config_type: the config dataclass of the method.
        add_fn: builds the adapter into the model (in place) and returns the model.
        variant: a boolean field of the config; when given, `add_fn` is used only for
            configs whose field is true (e.g. "use_dora" on LoraConfig).
    """
    _METHODS[(config_type, variant)] = add_fn


ExportFn = Callable[[nn.Module, str, Any], tuple[dict[str, Tensor], dict[str, Any], dict[str, str]]]
ImportFn = Callable[[nn.Module, str, dict[str, Any], dict[str, Tensor], dict[str, str]], nn.Module]


@dataclasses.dataclass(frozen=True)
class AdapterFormat:
    """How one method's adapter becomes files and back (pure: tensors and dicts, no I/O).

    export(model, adapter_name, config) -> (tensors under their file keys,
        adapter_config.json fields without peft_type, extra safetensors header metadata)
    load(model, adapter_name, config_json, tensors, metadata) -> the model carrying the adapter
        (it calls add_adapter itself, then copies the tensors in)
    """

    peft_type: str  # "LORA", "PROMPT_TUNING", "IA3", … (written to adapter_config.json)
    config_type: type
    export: ExportFn
    load: ImportFn
    variant: str | None = (
        None  # boolean field selecting this format (config or json), e.g. "use_dora"
    )


_FORMATS: list[AdapterFormat] = []


def register_format(fmt: AdapterFormat) -> None:
    """Make save_adapter/load_adapter handle a method (see AdapterFormat)."""
    _FORMATS[:] = [f for f in _FORMATS if (f.peft_type, f.variant) != (fmt.peft_type, fmt.variant)]
    _FORMATS.append(fmt)


def _pick(candidates: list[AdapterFormat], flags: Callable[[str], Any]) -> AdapterFormat | None:
    chosen = [f for f in candidates if f.variant and flags(f.variant)]
    chosen += [f for f in candidates if f.variant is None]
    return chosen[0] if chosen else None


def format_for_config(config: Any) -> AdapterFormat:
    """The file format of an adapter config (its variant first)."""
    for attempt in range(2):
        found = _pick(
            [f for f in _FORMATS if f.config_type is type(config)],
            lambda v: getattr(config, v, False),
        )
        if found or attempt:
            break
        _import_plugins()
    if found is None:
        raise SlimtuneError(f"no file format registered for {type(config).__name__}")
    return found


def format_for_json(config_json: dict[str, Any]) -> AdapterFormat:
    """The file format of an adapter_config.json (by peft_type, then variant flags)."""
    peft_type = config_json.get("peft_type")
    for attempt in range(2):
        found = _pick(
            [f for f in _FORMATS if f.peft_type == peft_type], lambda v: config_json.get(v)
        )
        if found or attempt:
            break
        _import_plugins()
    if found is None:
        known = ", ".join(sorted({f.peft_type for f in _FORMATS}))
        raise SlimtuneError(
            f"adapter_config.json has peft_type={peft_type!r}; slimtune reads: {known}"
        )
    return found


PEFT_PREFIX = "base_model.model."  # key prefix of PEFT's adapter files


def config_from_json(
    config_type: type, data: dict[str, Any], known: set[str] | frozenset[str] = frozenset()
) -> Any:
    """Build a config dataclass from adapter_config.json fields.

    Fields the dataclass lacks are dropped: silently when listed in `known` (fields the
    writer's library has and slimtune does not use), with one warning line otherwise.
    """
    names = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(k for k in data if k not in names and k not in known and k != "peft_type")
    if unknown:
        warnings.warn(
            f"adapter_config.json: ignoring unknown keys: {', '.join(unknown)}", stacklevel=3
        )
    kwargs = {k: v for k, v in data.items() if k in names}
    try:
        return config_type(**kwargs)
    except TypeError as exc:
        raise SlimtuneError(
            f"adapter_config.json does not describe a {config_type.__name__}: {exc}"
        ) from exc


def _import_plugins() -> None:
    for name in PLUGIN_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def lookup_method(config: Any) -> AddFn:
    """The add function registered for this config (its variant first)."""
    for attempt in range(2):
        for (config_type, variant), add_fn in _METHODS.items():
            if type(config) is config_type and variant and getattr(config, variant, False):
                return add_fn
        if (type(config), None) in _METHODS:
            return _METHODS[(type(config), None)]
        if attempt == 0:
            _import_plugins()
    known = sorted({t.__name__ for t, _ in _METHODS})
    raise SlimtuneError(
        f"no adapter method for {type(config).__name__}; known configs: {', '.join(known)}"
    )


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


# ----------------------------------------------------------------------------- matching


def _layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _matches(targets: list[str] | set[str] | str, name: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def is_target(config: Any, name: str, targets: list[str] | set[str] | str) -> bool:
    """PEFT's check_target_module_exists for one module name."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude and _matches(exclude, name):
        return False
    for saved in getattr(config, "modules_to_save", None) or []:
        if re.match(rf"(^|.*\.){saved}($|\..*)", name):
            return False
    if isinstance(targets, str):
        return _matches(targets, name)
    if name in targets:
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(name, getattr(config, "layers_pattern", None))
    return index is not None and index in layers


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, Conv1D, a frozen quantized linear, or an adapter layer wrapping one."""
    module = getattr(module, "base_layer", module)
    linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    return linear or hasattr(module, "dequantize_weight")


def _head_names(model: nn.Module, config: Any) -> set[str]:
    """Output head(s) that "all-linear" leaves alone (PEFT: output embeddings, or a SEQ_CLS head)."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if get_out else None
    if head is None and getattr(config, "task_type", None) == "SEQ_CLS":
        head = next((getattr(model, n) for n in ("score", "classifier") if hasattr(model, n)), None)
    return {name for name, module in model.named_modules() if head is not None and module is head}


def resolve_targets(model: nn.Module, config: Any) -> list[str] | set[str] | str:
    """The target_modules of `config`, with None and "all-linear" made explicit."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise SlimtuneError(
                f"target_modules=None: no default for model type {model_type!r}; give target_modules "
                f"(known defaults: {', '.join(sorted(DEFAULT_TARGET_MODULES))})"
            )
        return list(DEFAULT_TARGET_MODULES[model_type])
    if isinstance(targets, str) and targets.lower() == "all-linear":
        heads = _head_names(model, config)
        return {n for n, m in model.named_modules() if _is_linear(m) and n not in heads}
    return targets


def find_targets(model: nn.Module, config: Any) -> list[str]:
    """Full names of the modules `config` selects; a SlimtuneError when nothing matches.

    An adapter layer already in place is a target itself (a second adapter joins it);
    the modules inside it (base_layer, lora_A, …) never are.
    """
    targets = resolve_targets(model, config)
    inside: list[str] = []
    names = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if is_adapter_layer(module):
            inside.append(f"{name}.")
        if is_target(config, name, targets):
            names.append(name)
    if not names:
        leaves = dict.fromkeys(
            n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not list(m.children())
        )
        raise SlimtuneError(
            f"target_modules={config.target_modules!r} matches no module of the model; "
            f"its module names are: {', '.join(leaves)}"
        )
    return names


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
        n for n, m in model.named_modules() if is_adapter_layer(m) and not is_mergeable(m)
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


# PEFT 0.21 TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (subset), plus phi3
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "llama": ["q_proj", "v_proj"],
    "gpt_bigcode": ["c_attn"],
    "falcon": ["query_key_value"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}
