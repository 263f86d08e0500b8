"""Every method slimtune has, in one table: its config, how it is added to a model, how its
files are written and read, and how `slimtune train --method NAME` prepares it.

    --method   config               adapter_config.json     module
    lora       LoraConfig           LORA                    methods/lora/
    qlora      LoraConfig           LORA (+ quant metadata) methods/lora/recipe.py (NF4 base)
    dora       LoraConfig(use_dora) LORA, use_dora: true    methods/dora.py
    ia3        IA3Config            IA3                     methods/ia3.py
    prompt     PromptTuningConfig   PROMPT_TUNING           methods/prompt.py
    adapter    BottleneckConfig     BOTTLENECK (slimtune)   methods/bottleneck.py
    full       -                    (a transformers dir)    methods/full.py

A row names its functions as "module:function" strings, resolved on first use, so that
`import slimtune` stays fast and this module imports no method module. The functions are:

    add(model, config, adapter_name) -> model        build the layers (in place)
    export(model, adapter_name, config) -> (tensors, adapter_config.json fields, header metadata)
    load(model, adapter_name, config_json, tensors, metadata) -> model   (calls add_adapter)
    prepare(model, options) -> model                 --method NAME, from the CLI's options

`add_adapter` dispatches on the config's type (and a variant flag such as use_dora) through
this table and records the adapter on the model (slimtune.adapters.named). Code outside
slimtune can add a row with `register_method` / `register_format`; slimtune's own methods
are all listed below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from importlib import import_module
from typing import TYPE_CHECKING, Any

from slimtune.config import BottleneckConfig, IA3Config, LoraConfig, PromptTuningConfig
from slimtune.errors import SlimtuneError

if TYPE_CHECKING:
    from torch import nn

Ref = str | Callable[..., Any] | None  # "module:function", a function, or None (not offered)


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the table (see the module docstring for the functions' signatures)."""

    name: str  # --method NAME
    config_type: type | None  # the config dataclass; None for full fine-tuning
    peft_type: str | None = None  # written to adapter_config.json
    variant: str | None = None  # a boolean config/json field selecting this row ("use_dora")
    add: Ref = None
    export: Ref = None
    load: Ref = None
    prepare: Ref = None
    saves: str = "adapter"  # RUN/adapter holds: "adapter" (PEFT directory) or "model" (full)


_LORA = "slimtune.methods.lora"
METHODS: tuple[Method, ...] = (
    Method("lora", LoraConfig, "LORA",
           add=f"{_LORA}.inject:add_lora", export=f"{_LORA}.peft_format:export_lora",
           load=f"{_LORA}.peft_format:load_lora", prepare=f"{_LORA}.recipe:prepare_lora"),
    Method("qlora", LoraConfig, prepare=f"{_LORA}.recipe:prepare_qlora"),
    Method("dora", LoraConfig, "LORA", variant="use_dora",
           add="slimtune.methods.dora:add_dora", export="slimtune.methods.dora:export_dora",
           load="slimtune.methods.dora:load_dora", prepare="slimtune.methods.dora:prepare_dora"),
    Method("ia3", IA3Config, "IA3",
           add="slimtune.methods.ia3:add_ia3", export="slimtune.methods.ia3:export_ia3",
           load="slimtune.methods.ia3:load_ia3", prepare="slimtune.methods.ia3:prepare_ia3"),
    Method("prompt", PromptTuningConfig, "PROMPT_TUNING",
           add="slimtune.methods.prompt:add_prompt", export="slimtune.methods.prompt:export_prompt",
           load="slimtune.methods.prompt:load_prompt",
           prepare="slimtune.methods.prompt:prepare_prompt"),
    Method("adapter", BottleneckConfig, "BOTTLENECK",
           add="slimtune.methods.bottleneck:add_bottleneck",
           export="slimtune.methods.bottleneck:export_bottleneck",
           load="slimtune.methods.bottleneck:load_bottleneck",
           prepare="slimtune.methods.bottleneck:prepare_bottleneck"),
    Method("full", None, prepare="slimtune.methods.full:prepare_full", saves="model"),
)  # fmt: skip

_REGISTERED: list[Method] = []  # rows added at run time by code outside slimtune


def resolve(ref: Ref) -> Callable[..., Any]:
    """The function a row names ("module:function" is imported on first use)."""
    if ref is None:
        raise SlimtuneError("this method does not offer that operation")
    if callable(ref):
        return ref
    module, _, function = ref.partition(":")
    return getattr(import_module(module), function)


def _rows() -> list[Method]:
    return [*_REGISTERED, *METHODS]


def method_names() -> list[str]:
    """The names `--method` accepts, in table order."""
    return [row.name for row in METHODS if row.prepare is not None]


def method_named(name: str) -> Method:
    """The row of `--method name`."""
    for row in METHODS:
        if row.name == name and row.prepare is not None:
            return row
    raise SlimtuneError(
        f"--method {name!r} is not available; available: {', '.join(method_names())}"
    )


def _pick(rows: list[Method], flag: Callable[[str], Any]) -> Method | None:
    chosen = [r for r in rows if r.variant and flag(r.variant)]
    chosen += [r for r in rows if r.variant is None]
    return chosen[0] if chosen else None


def method_for_config(config: Any, needs: str = "add") -> Method:
    """The row that builds (needs="add") or saves (needs="export") adapters of this config."""
    rows = [r for r in _rows() if r.config_type is type(config) and getattr(r, needs)]
    found = _pick(rows, lambda v: getattr(config, v, False))
    if found is None:
        known = sorted({r.config_type.__name__ for r in _rows() if r.config_type})
        what = "adapter method" if needs == "add" else "file format"
        raise SlimtuneError(
            f"no {what} for {type(config).__name__}; known configs: {', '.join(known)}"
        )
    return found


def method_for_json(config_json: dict[str, Any]) -> Method:
    """The row that reads an adapter_config.json (by peft_type, then variant flags)."""
    peft_type = config_json.get("peft_type")
    rows = [r for r in _rows() if r.load and r.peft_type == peft_type]
    found = _pick(rows, lambda v: config_json.get(v))
    if found is None:
        known = ", ".join(sorted({r.peft_type for r in _rows() if r.load and r.peft_type}))
        raise SlimtuneError(
            f"adapter_config.json has peft_type={peft_type!r}; slimtune reads: {known}"
        )
    return found


def add_adapter(model: nn.Module, config: Any, adapter_name: str = "default") -> nn.Module:
    """Add an adapter described by `config` to `model` (in place) and return the model.

    The first adapter becomes active and trainable and everything else is frozen; a
    later adapter is added inactive (and frozen) until `set_adapter` picks it, as in PEFT.
    """
    from slimtune.adapters.named import check_new_name, record_adapter

    check_new_name(model, adapter_name)
    model = resolve(method_for_config(config).add)(model, config, adapter_name)
    record_adapter(model, adapter_name, config)
    return model


def export_adapter(model: nn.Module, adapter_name: str, config: Any) -> tuple[dict, dict, dict]:
    """(tensors, adapter_config.json with peft_type, header metadata) of one adapter."""
    row = method_for_config(config, needs="export")
    tensors, fields, metadata = resolve(row.export)(model, adapter_name, config)
    return tensors, {"peft_type": row.peft_type, **fields}, metadata


def load_adapter_contents(
    model: nn.Module, adapter_name: str, config_json: dict, tensors: dict, metadata: dict
) -> nn.Module:
    """Add an adapter to `model` from the contents of its files (see slimtune.adapter_dir)."""
    load = resolve(method_for_json(config_json).load)
    return load(model, adapter_name, config_json, tensors, metadata)


# ----------------------------------------------------------------------------- extension


AddFn = Callable[["nn.Module", Any, str], "nn.Module"]


@dataclasses.dataclass(frozen=True)
class AdapterFormat:
    """How a method outside slimtune becomes files and back (pure: tensors and dicts, no I/O).

    export(model, adapter_name, config) -> (tensors under their file keys,
        adapter_config.json fields without peft_type, extra safetensors header metadata)
    load(model, adapter_name, config_json, tensors, metadata) -> the model carrying the adapter
        (it calls add_adapter itself, then copies the tensors in)
    """

    peft_type: str
    config_type: type
    export: Callable[..., Any]
    load: Callable[..., Any]
    variant: str | None = None


def register_method(config_type: type, add_fn: AddFn, *, variant: str | None = None) -> None:
    """Make `add_adapter` call `add_fn(model, config, name)` for configs of `config_type`
    (for methods defined outside slimtune; slimtune's own are in METHODS)."""
    name = f"{config_type.__name__}:{variant or ''}"
    _REGISTERED[:] = [r for r in _REGISTERED if not (r.name == name and r.add)]
    _REGISTERED.insert(0, Method(name, config_type, variant=variant, add=add_fn))


def register_format(fmt: AdapterFormat) -> None:
    """Make save_adapter/load_adapter handle a method defined outside slimtune."""
    row = Method(f"{fmt.config_type.__name__}:{fmt.variant or ''}:file", fmt.config_type,
                 fmt.peft_type, fmt.variant, export=fmt.export, load=fmt.load)  # fmt: skip
    _REGISTERED[:] = [r for r in _REGISTERED if r.name != row.name]
    _REGISTERED.insert(0, row)
