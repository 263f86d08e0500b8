"""What PEFT's adapter files share across methods: the key prefix, reading a config dataclass
from adapter_config.json fields, and copying file tensors into a model key for key.

Everything here is pure (tensors and dicts, no files): the files themselves are read and
written by slimtune.adapter_dir.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import Tensor

from slimtune.errors import SlimtuneError

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
