"""slimtune: parameter-efficient fine-tuning with PEFT-compatible adapter files.

    import slimtune as st
    model = st.add_adapter(model, st.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    st.trainable_parameters(model)   # (trainable, total)
    st.save_adapter(model, "out/")   # a PEFT directory

Names are loaded lazily so that `import slimtune` (and the command line) starts fast.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "SlimtuneError": "slimtune.errors",
    "LoraConfig": "slimtune.config",
    "PromptTuningConfig": "slimtune.config",
    "BottleneckConfig": "slimtune.config",
    "IA3Config": "slimtune.config",
    "TrainConfig": "slimtune.config",
    "add_adapter": "slimtune.inject",
    "trainable_parameters": "slimtune.inject",
    "set_adapter": "slimtune.inject",
    "delete_adapter": "slimtune.inject",
    "disable_adapter": "slimtune.inject",
    "add_weighted_adapter": "slimtune.inject",
    "merge": "slimtune.inject",
    "unmerge": "slimtune.inject",
    "merge_and_unload": "slimtune.inject",
    "unload": "slimtune.inject",
    "adapter_configs": "slimtune.inject",
    "active_adapter": "slimtune.inject",
    "register_method": "slimtune.inject",
    "register_format": "slimtune.inject",
    "AdapterFormat": "slimtune.inject",
    "read_adapter_config": "slimtune.io",
    "read_adapter_metadata": "slimtune.io",
    "save_adapter": "slimtune.io",
    "load_adapter": "slimtune.io",
    "quantize_model": "slimtune.quant.linear",
    "load_model": "slimtune.models",
    "train": "slimtune.train",
    "evaluate": "slimtune.evaluate",
    "generate": "slimtune.evaluate",
    "compare": "slimtune.compare",
    "CompareSettings": "slimtune.compare",
    "export_safetensors": "slimtune.export",
    "export_gguf": "slimtune.export",
    "export_gguf_lora": "slimtune.export",
}

__all__ = ["__version__", "quant", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "quant":
        return import_module("slimtune.quant")
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
