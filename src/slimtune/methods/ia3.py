"""IA³ (Infused Adapter by Inhibiting and Amplifying Inner Activations), Liu et al. 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv:2205.05638.

Learned vectors rescale activations element-wise: the keys and values of attention
(on the projection's output) and the MLP's down projection (on its input):

    keys, values:   x ─► W (frozen) ─► ⊙ l (out,) ─► h        h = l ⊙ (W x)
    feed-forward:   x ─► ⊙ l (in,) ─► W (frozen) ─► h         h = W (l ⊙ x)

The vectors start at 1, so training starts at the base model. A layer adds only
`out` (or `in`) parameters. Merging scales W's rows (or columns) by l, so merged
inference costs nothing; for an output-scaled layer the bias is scaled too (as PEFT).

Files: PEFT's IA3 format, `base_model.model.<module>.ia3_l` with shape (out, 1) for
output-scaled layers and (1, in) for feed-forward ones (fan_in_fan_out transposes).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.adapters.layers import SingleActiveAdapter
from slimtune.config import IA3Config
from slimtune.errors import SlimtuneError

# PEFT 0.21 TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING (subset)
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
}

# ----------------------------------------------------------------------------- math


def scale_output(h: Tensor, vector: Tensor) -> Tensor:
    """l ⊙ h over the last dimension: h (…, out), l (out,)."""
    return (h * vector.flatten()).to(h.dtype)


def scale_input(x: Tensor, vector: Tensor) -> Tensor:
    """l ⊙ x over the last dimension: x (…, in), l (in,)."""
    return (x * vector.flatten()).to(x.dtype)


def merge_ia3(w: Tensor, vector: Tensor, feedforward: bool, fan_in_fan_out: bool = False) -> Tensor:
    """W with its rows (outputs) or columns (inputs, feed-forward) scaled by l, in W's dtype."""
    vector = vector.flatten().float()
    scale = vector[None, :] if feedforward else vector[:, None]  # (1, in) or (out, 1)
    scale = scale.T if fan_in_fan_out else scale  # Conv1D stores (in, out)
    return (w.float() * scale).to(w.dtype)


# ----------------------------------------------------------------------------- layer


class IA3Linear(SingleActiveAdapter, nn.Module):
    """A frozen Linear/Conv1D with named IA³ vectors (one active adapter)."""

    adapter_store = "ia3_l"

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        super().__init__()
        if type(base_layer).__name__ == "Conv1D":  # GPT-2: weight (in, out)
            self.in_features, self.out_features = base_layer.weight.shape
            self.fan_in_fan_out = True
        elif isinstance(base_layer, nn.Linear):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
            self.fan_in_fan_out = False
        else:
            raise SlimtuneError(
                f"IA3 adapts Linear and Conv1D layers, not {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.feedforward = feedforward
        self.ia3_l = nn.ParameterDict()
        self.active: str | None = None
        self.enabled = True
        self.merged_adapters: list[str] = []

    def add_adapter(self, name: str, init_ones: bool = True) -> None:
        shape = (1, self.in_features) if self.feedforward else (self.out_features, 1)
        device = self.base_layer.weight.device
        vector = (
            torch.ones(shape, device=device) if init_ones else torch.randn(shape, device=device)
        )
        self.ia3_l[name] = nn.Parameter(vector, requires_grad=False)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not self.enabled or self.merged_adapters or self.active not in self.ia3_l:
            return self.base_layer(x, *args, **kwargs)
        vector = self.ia3_l[self.active]
        if self.feedforward:
            return self.base_layer(scale_input(x, vector), *args, **kwargs)
        return scale_output(self.base_layer(x, *args, **kwargs), vector)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise SlimtuneError(f"adapter {name!r} is merged; unmerge before deleting it")
        super().delete_adapter(name)

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled and self.merged_adapters:
            raise SlimtuneError("cannot disable a merged adapter; unmerge first")
        super().enable_adapters(enabled)

    def _scale_weights(self, vector: Tensor) -> None:
        base = self.base_layer
        base.weight.data = merge_ia3(
            base.weight.data, vector, self.feedforward, self.fan_in_fan_out
        )
        if not self.feedforward and getattr(base, "bias", None) is not None:
            base.bias.data = (base.bias.data.float() * vector.flatten()).to(base.bias.dtype)

    def merge(self, names: list[str]) -> None:
        for name in [n for n in names if n in self.ia3_l and n not in self.merged_adapters]:
            self._scale_weights(self.ia3_l[name].detach().float())
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            vector = self.ia3_l[self.merged_adapters.pop()].detach().float()
            self._scale_weights(1.0 / (vector + 1e-8))  # PEFT's tolerance against zeros

    def unload(self) -> nn.Module:
        return self.base_layer


# ----------------------------------------------------------------------------- method


def _is_feedforward(config: IA3Config, name: str) -> bool:
    """PEFT's _check_target_module_feedforward: regex full match, or a plain suffix."""
    import re

    ff = config.feedforward_modules or []
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(key) for key in ff)


def resolve_config(model: nn.Module, config: IA3Config) -> IA3Config:
    """Fill target_modules / feedforward_modules from the model type when they are None."""
    if config.target_modules is not None and config.feedforward_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise SlimtuneError(
            f"IA3: no default target_modules for model type {model_type!r}; give "
            f"target_modules and feedforward_modules (known: {', '.join(sorted(DEFAULT_TARGETS))})"
        )
    targets, ff = DEFAULT_TARGETS[model_type]
    return replace(
        config,
        target_modules=config.target_modules if config.target_modules is not None else targets,
        feedforward_modules=ff
        if config.feedforward_modules is None
        else config.feedforward_modules,
    )


def add_ia3(model: nn.Module, config: IA3Config, adapter_name: str) -> nn.Module:
    """Wrap every target of `config` in an IA3Linear and add adapter `adapter_name`."""
    from slimtune.adapters.layers import freeze_all, replace_module, wrap_modules_to_save
    from slimtune.adapters.targets import is_target

    config = resolve_config(model, config)
    names = [
        n
        for n, m in model.named_modules()
        if n and is_target(config, n, config.target_modules) and not n.endswith(".base_layer")
    ]
    if not names:
        raise SlimtuneError(f"IA3: target_modules={config.target_modules!r} matches no module")
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, IA3Linear):
            layer = IA3Linear(layer, _is_feedforward(config, name))
            replace_module(model, name, layer)
        layer.add_adapter(adapter_name, config.init_ia3_weights)
    wrap_modules_to_save(model, config.modules_to_save, adapter_name)
    freeze_all(model)
    return model


# ----------------------------------------------------------------------------- files

PEFT_IA3_FIELDS = {"auto_mapping", "base_model_name_or_path", "inference_mode", "peft_version",
                   "revision"}  # fmt: skip


def export_ia3(model: nn.Module, adapter_name: str, config: IA3Config):
    """(tensors, adapter_config.json fields, metadata) in PEFT's IA3 format."""
    from slimtune.adapters.peft_keys import PEFT_PREFIX

    config = resolve_config(model, config)
    tensors = {
        f"{PEFT_PREFIX}{name}.ia3_l": layer.ia3_l[adapter_name]
        for name, layer in model.named_modules()
        if isinstance(layer, IA3Linear) and adapter_name in layer.ia3_l
    }
    fields = {
        "target_modules": config.target_modules,
        "feedforward_modules": config.feedforward_modules,
        "exclude_modules": config.exclude_modules,
        "fan_in_fan_out": config.fan_in_fan_out,
        "init_ia3_weights": config.init_ia3_weights,
        "modules_to_save": config.modules_to_save,
        "task_type": config.task_type,
        "inference_mode": True,
        "auto_mapping": None,
        "revision": None,
        "peft_version": "0.21.2",
    }
    return tensors, fields, {}


def load_ia3(model: nn.Module, adapter_name: str, config_json, tensors, metadata) -> nn.Module:
    """Add an IA3 adapter from PEFT file contents; every vector must fit its layer."""
    from slimtune.adapters.peft_keys import PEFT_PREFIX, config_from_json, copy_adapter_tensors
    from slimtune.methods.table import add_adapter

    strings = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)  # noqa: E731
    data = {k: sorted(v) if strings(v) else v for k, v in config_json.items()}
    config = config_from_json(IA3Config, data, known=PEFT_IA3_FIELDS)
    model = add_adapter(model, config, adapter_name)
    expected = {
        f"{PEFT_PREFIX}{name}.ia3_l": layer.ia3_l[adapter_name]
        for name, layer in model.named_modules()
        if isinstance(layer, IA3Linear) and adapter_name in layer.ia3_l
    }
    copy_adapter_tensors(expected, tensors, "IA3 file")
    return model


def prepare_ia3(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """`--method ia3`: vectors on PEFT's default modules, or on --target-modules."""
    from slimtune.methods.options import parse_targets
    from slimtune.methods.table import add_adapter

    targets = parse_targets(options.get("target_modules"))
    if targets == "all-linear":
        raise SlimtuneError("--target-modules all-linear is not accepted for ia3: name the modules")
    config = IA3Config(target_modules=targets, feedforward_modules=[] if targets else None,
                       task_type="CAUSAL_LM")  # fmt: skip
    return add_adapter(model, config)
