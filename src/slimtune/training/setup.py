"""From `--method NAME` to a model ready to train and the function that saves what it trained.

    prepare_method(model, "qlora", options) -> (model, save_fn)     save_fn(model, RUN/adapter)

The method's row in slimtune.methods.table says how to prepare it and whether RUN/adapter is
a PEFT adapter directory or a full transformers directory; this module adds the file side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from slimtune.adapter_dir import save_adapter
from slimtune.atomic import write_atomic_dir
from slimtune.methods.table import method_named, resolve
from slimtune.quant.linear import quant_metadata

SaveFn = Callable[[nn.Module, Path], Any]


def adapter_saver(base: str | None) -> SaveFn:
    """save_fn writing the active adapter as a PEFT directory (with the base's quantization)."""

    def save(model: nn.Module, directory: Path) -> Any:
        metadata = quant_metadata(model) or None
        return save_adapter(
            model, directory, base_model_name_or_path=base, metadata=metadata, overwrite=True
        )

    return save


def full_saver(model_spec: str | None) -> SaveFn:
    """save_fn writing a full transformers directory (safetensors) with the base's tokenizer."""

    def save(model: nn.Module, directory: Path) -> Path:
        from slimtune.models import load_tokenizer

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            if model_spec:
                load_tokenizer(model_spec).save_pretrained(tmp)

        write_atomic_dir(Path(directory), write)
        return Path(directory)

    return save


def prepare_method(
    model: nn.Module, method: str, options: dict[str, Any]
) -> tuple[nn.Module, SaveFn]:
    """Add the method's trainable parameters to `model`; return (model, save_fn)."""
    row = method_named(method)
    if options.get("model") and options.get("tokenizer_path") is None:
        from slimtune.models import model_directory

        options = {**options, "tokenizer_path": str(model_directory(options["model"]))}
    model = resolve(row.prepare)(model, options)
    if row.saves == "model":
        return model, full_saver(options.get("model"))
    return model, adapter_saver(options.get("base_model"))
