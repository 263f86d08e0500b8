"""RUN/config.yaml: the options a run really used, reusable from any directory.

    slimtune train --config runs/a/config.yaml --out runs/b      # the same run again, anywhere

Defaults are written out (rank, alpha, dropout, the modules the adapter went into, the
quantization), paths are absolute, and options the method does not read are left out
(cli/applies.py would refuse them when the file is read back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

PATH_KEYS = ("data", "eval_data", "out", "chat_template")  # a --chat-template FILE.jinja too


def absolute(value: str) -> str:
    """Each comma-separated path that exists, made absolute (other names stay as typed)."""
    parts = [Path(part).expanduser() for part in str(value).split(",")]
    return ",".join(str(p.absolute()) if p.exists() else str(p) for p in parts)


def recorded_options(model: nn.Module, run: dict[str, Any]) -> dict[str, Any]:
    """The run options as resolved on `model` (after the method's prepare)."""
    from slimtune.adapters.layers import is_adapter_layer
    from slimtune.adapters.named import active_adapter, adapter_configs
    from slimtune.config import LoraConfig

    options = {k: v for k, v in run.items() if v is not None}
    for key in ("model", *PATH_KEYS):
        if key in options:
            options[key] = absolute(options[key])
    if "out" in options:
        options["out"] = str(Path(run["out"]).expanduser().absolute())
    config = adapter_configs(model).get(active_adapter(model) or "")
    if isinstance(config, LoraConfig):
        layers = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_adapter_layer(m)}
        options.update(
            rank=config.r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=",".join(sorted(layers)),
        )
    if run.get("method") == "qlora":
        options["quant"] = run.get("quant") or "nf4"
    for key in ("num_virtual_tokens", "bottleneck_size"):
        if hasattr(config, key):
            options[key] = getattr(config, key)
    return options
