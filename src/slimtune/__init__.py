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
    "add_adapter": "slimtune.methods.table",
    "trainable_parameters": "slimtune.adapters.named",
    "set_adapter": "slimtune.adapters.named",
    "delete_adapter": "slimtune.adapters.named",
    "disable_adapter": "slimtune.adapters.named",
    "add_weighted_adapter": "slimtune.methods.lora.combine",
    "merge": "slimtune.adapters.named",
    "unmerge": "slimtune.adapters.named",
    "merge_and_unload": "slimtune.adapters.named",
    "unload": "slimtune.adapters.named",
    "adapter_configs": "slimtune.adapters.named",
    "active_adapter": "slimtune.adapters.named",
    "register_method": "slimtune.methods.table",
    "register_format": "slimtune.methods.table",
    "AdapterFormat": "slimtune.methods.table",
    "read_adapter_config": "slimtune.adapter_dir",
    "read_adapter_metadata": "slimtune.adapter_dir",
    "save_adapter": "slimtune.adapter_dir",
    "load_adapter": "slimtune.adapter_dir",
    "quantize_model": "slimtune.quant.linear",
    "load_model": "slimtune.models",
    "train": "slimtune.training.loop",
    "evaluate": "slimtune.evaluate",
    "generate": "slimtune.evaluate",
    "compare": "slimtune.compare.run",
    "CompareSettings": "slimtune.compare.run",
    "export_safetensors": "slimtune.export.merged",
    "export_gguf": "slimtune.export.gguf",
    "export_gguf_lora": "slimtune.export.gguf",
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
