"""The plug-in registry: which function adds a method to a model, and which format saves it.

    register_method(MyConfig, add_fn)                      # add_fn(model, config, name) -> model
    register_method(LoraConfig, add_dora, variant="use_dora")  # chosen when config.use_dora
    register_format(AdapterFormat("PROMPT_TUNING", MyConfig, export_fn, load_fn))

`inject.add_adapter` dispatches on the config through `lookup_method`; `io.save_adapter` and
`io.load_adapter` through `format_for_config` / `format_for_json`. Method modules register
themselves when imported; the modules in PLUGIN_MODULES are imported on the first lookup
that misses, so `import slimtune` stays fast and methods never import file code.
Everything here is pure (tensors and dicts, no files).
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

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
PEFT_PREFIX = "base_model.model."  # key prefix of PEFT's adapter files


def register_method(config_type: type, add_fn: AddFn, *, variant: str | None = None) -> None:
    """Make `add_adapter` call `add_fn(model, config, name)` for configs of `config_type`.

    Args:
        config_type: the config dataclass of the method.
        add_fn: builds the adapter into the model (in place) and returns the model.
        variant: a boolean field of the config; when given, `add_fn` is used only for
            configs whose field is true (e.g. "use_dora" on LoraConfig).
    """
    _METHODS[(config_type, variant)] = add_fn


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


def copy_adapter_tensors(
    expected: dict[str, Tensor], tensors: dict[str, Tensor], what: str
) -> None:
    """Copy file tensors into the model's adapter tensors, key for key and shape for shape.

    Args:
        expected: key -> the model's tensor that the file's tensor of that key fills.
        tensors: key -> tensor read from the file.
        what: names the file in the error ("IA3 file", …).

    Raises:
        SlimtuneError: a key missing on either side, or a shape that differs (names both).
    """
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise SlimtuneError(
            f"{what} does not fit the model: missing {missing[:2]}, unexpected {extra[:2]}"
        )
    with torch.no_grad():
        for key, target in expected.items():
            if target.shape != tensors[key].shape:
                raise SlimtuneError(
                    f"{what}: {key} has shape {tuple(tensors[key].shape)} in the file, "
                    f"the model needs {tuple(target.shape)}"
                )
            target.copy_(tensors[key])
