"""Adapter files in Hugging Face PEFT's format, both ways.

    DIR/adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, …}
    DIR/adapter_model.safetensors    base_model.model.<module>.lora_A.weight, …

Keys carry no adapter name (PEFT strips it: `q_proj.lora_A.default.weight` is saved as
`q_proj.lora_A.weight`) and start with `base_model.model.`. What PEFT has no field for
(e.g. the quantization an adapter was trained on, or the slices of a fused projection)
goes into the safetensors header metadata, which PEFT ignores.

Each method's conversion between a model and (tensors, config dict) is named by its row in
slimtune.methods.table (methods never touch files); this module only reads and writes them.
Writes are atomic (temporary directory, then rename); pickled weights are never loaded.
"""

from __future__ import annotations

import json
import os
import types
import typing
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from slimtune.adapters.named import active_adapter, adapter_configs
from slimtune.atomic import prepare_out_dir, write_atomic_dir
from slimtune.errors import SlimtuneError
from slimtune.file_checks import check_safetensors, load_safetensors, read_json_file
from slimtune.methods.table import export_adapter, load_adapter_contents, method_for_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


# ----------------------------------------------------------------------------- writing


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    base_model_name_or_path: str | None = None,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one adapter as a PEFT directory (adapter_config.json + adapter_model.safetensors).

    Args:
        model: a model carrying the adapter.
        path: the output directory (refused if it exists and is not empty, unless overwrite).
        adapter_name: which adapter (the active one by default).
        base_model_name_or_path: recorded in adapter_config.json (PEFT loads the base from it).
        metadata: extra string pairs for the safetensors header (PEFT ignores them).
        overwrite: replace an existing directory.

    Returns:
        The directory written.
    """
    name = adapter_name or active_adapter(model)
    configs = adapter_configs(model)
    if name not in configs:
        raise SlimtuneError(
            f"no adapter named {name!r} to save; the model has: {', '.join(configs) or 'none'}"
        )
    out = prepare_out_dir(path, overwrite)
    tensors, config_json, extra = export_adapter(model, name, configs[name])
    if base_model_name_or_path is not None:
        config_json["base_model_name_or_path"] = str(base_model_name_or_path)
    header = {"format": "pt", **extra, **(metadata or {})}
    bad = [k for k, v in header.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise SlimtuneError(
            f"metadata[{bad[0]!r}] is not accepted: keys and values must be strings"
        )
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=header)

    write_atomic_dir(out, write)
    return out


# ----------------------------------------------------------------------------- reading


def _adapter_dir(path: str | os.PathLike) -> Path:
    directory = Path(path).expanduser()
    if not directory.exists():
        raise SlimtuneError(f"adapter directory {directory} does not exist")
    if not directory.is_dir():
        raise SlimtuneError(
            f"adapter {directory} is a file; give the directory holding {CONFIG_NAME}"
        )
    if not (directory / CONFIG_NAME).is_file():
        if (directory / "adapter" / CONFIG_NAME).is_file():  # a run directory
            raise SlimtuneError(
                f"{directory} is a run directory; its adapter is {directory / 'adapter'}"
            )
        if (directory / "config.json").is_file():  # what a full fine-tuning run saves
            raise SlimtuneError(
                f"{directory} holds a whole model (config.json), not an adapter: full "
                f"fine-tuning saves one; use it as --model {directory}, without --adapter"
            )
        raise SlimtuneError(f"adapter directory {directory} has no {CONFIG_NAME}")
    return directory


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The adapter_config.json of an adapter directory, as a dict."""
    file = _adapter_dir(path) / CONFIG_NAME
    data = read_json_file(file, "adapter config")
    if not isinstance(data, dict):
        raise SlimtuneError(f"{file} must hold a JSON object")
    return data


def _weights_file(directory: Path) -> Path:
    file = directory / WEIGHTS_NAME
    if file.is_file():
        return file
    pickled = [directory / n for n in PICKLED_NAMES if (directory / n).is_file()]
    if pickled:
        p = pickled[0]
        raise SlimtuneError(
            f"{p} is a pickled file, which slimtune never loads (it can run code); convert it once "
            'with: python -c "import torch, safetensors.torch as s; '
            f"s.save_file(torch.load('{p.absolute()}', weights_only=True), "
            f"'{p.absolute().parent / WEIGHTS_NAME}')\""
        )
    raise SlimtuneError(f"adapter directory {directory} has no {WEIGHTS_NAME}")


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of an adapter directory (without "format")."""
    file = _weights_file(_adapter_dir(path))
    meta = dict(check_safetensors(file).get("__metadata__") or {})
    meta.pop("format", None)
    return meta


def read_adapter_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of an adapter directory; a corrupt file is a SlimtuneError."""
    tensors, meta = load_safetensors(_weights_file(_adapter_dir(path)))
    meta.pop("format", None)
    return tensors, meta


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default"
) -> nn.Module:
    """Add the adapter stored in a PEFT (or slimtune) directory to `model`; returns the model.

    The first adapter loaded becomes active; later ones are added inactive (set_adapter).
    Shapes that do not fit the model are a SlimtuneError naming the module and both shapes.
    """
    config_json = read_adapter_config(path)
    tensors, metadata = read_adapter_tensors(path)
    return load_adapter_read(model, path, config_json, tensors, metadata, adapter_name)


def load_adapter_read(
    model: nn.Module,
    path: str | os.PathLike,
    config_json: dict[str, Any],
    tensors: dict[str, Tensor],
    metadata: dict[str, str],
    adapter_name: str = "default",
) -> nn.Module:
    """`load_adapter` from the directory's contents, already read (`path` names it in errors)."""
    try:
        check_config_json(Path(path) / CONFIG_NAME, config_json, tensors)
        return load_adapter_contents(model, adapter_name, config_json, tensors, metadata)
    except SlimtuneError as exc:
        raise SlimtuneError(f"adapter {path}: {exc}") from None


# ----------------------------------------------------------------------------- checking

SIZE_FIELDS = ("r", "num_virtual_tokens", "token_dim", "bottleneck_size", "rank_pattern")


def check_config_json(file: Path, config_json: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Each field has its config's type, and no size exceeds every tensor dimension in the file
    (so a damaged `r` cannot make the loader allocate a huge layer before the shapes are read)."""
    config_type = method_for_json(config_json).config_type
    hints = typing.get_type_hints(config_type) if config_type is not None else {}
    for key, value in config_json.items():
        if key in hints and not _fits(value, hints[key]):
            shown = json.dumps(value)[:40]
            raise SlimtuneError(f"{file}: {key}={shown} is not accepted (expected {hints[key]})")
    largest = max((max(t.shape, default=1) for t in tensors.values()), default=0)
    for key in SIZE_FIELDS:
        value = config_json.get(key)
        sizes = value.values() if isinstance(value, dict) else [value]
        too_big = [v for v in sizes if isinstance(v, int) and v > largest]
        if too_big:
            raise SlimtuneError(
                f"{file}: {key}={too_big[0]} exceeds every tensor dimension in {WEIGHTS_NAME} "
                f"({largest}); the two files do not belong together"
            )


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the type `hint` (unknown kinds of hint are left to the config)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        number = (int, float) if hint is float else int
        return isinstance(value, number) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(v, args[1]) for v in value.values())
    return True
