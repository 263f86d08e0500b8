"""DoRA: weight-decomposed low-rank adaptation, Liu et al. 2024, arXiv:2402.09353.

The adapted weight is split into a magnitude (one trainable number per output row)
and a direction (W0 plus a LoRA update, normalised row by row):

    W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row        m ∈ R^out, starts at ‖W0‖_row

    x ──► base_layer (W0 x + bias) ─────────────────────────────────┐
    │                                                               ▼
    └─► dropout ─► A ─► B ─► × s ─► (+ W0 x) ─► × m/‖W0 + s·BA‖ ─► (+ bias) ─► h

As in the paper (section 4.3) and in PEFT, the norm is treated as a constant in the
backward pass (detached), which saves memory; the forward is PEFT's:

    h = base(x) + (m/n − 1) ⊙ (W0 x) + (m/n) ⊙ s·B A x,   n = ‖W0 + s·B A‖_row

Merging writes W' itself into the base weight (bias untouched) and remembers n so that
unmerging can undo it. Files: PEFT's LoRA format plus one `lora_magnitude_vector` (out,)
per layer and `"use_dora": true`. DoRA applies to linear layers (nn.Linear, GPT-2's
Conv1D, quantized linears); embeddings and fused QKV slices are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.errors import SlimtuneError
from slimtune.methods.lora.layers import LoraLinear, base_weight

# ----------------------------------------------------------------------------- math


def weight_norm(w0: Tensor, delta: Tensor) -> Tensor:
    """‖W0 + delta‖ of every output row: (out, in) -> (out,), in W0's dtype."""
    return torch.linalg.norm(w0 + delta.to(w0.dtype), dim=1).to(w0.dtype)


def dora_factor(magnitude: Tensor, w0: Tensor, delta: Tensor) -> Tensor:
    """m / ‖W0 + delta‖_row, with the norm detached (no gradient flows through it)."""
    return magnitude / weight_norm(w0, delta.detach()).detach()  # (out,)


def dora_weight(w0: Tensor, delta: Tensor, magnitude: Tensor) -> Tensor:
    """The merged DoRA weight m ⊙ (W0 + delta) / ‖W0 + delta‖_row, (out, in) in float32."""
    w = w0.float() + delta.float()
    return (magnitude.float() / torch.linalg.norm(w, dim=1))[:, None] * w


def dora_extra(
    x: Tensor,
    base_result: Tensor,
    a: Tensor,
    b: Tensor,
    magnitude: Tensor,
    w0: Tensor,
    scaling: float,
) -> Tensor:
    """What DoRA adds to the base layer's output (PEFT's DoraLinearLayer.forward).

    Args:
        x: (…, in) the (dropped-out) input.
        base_result: (…, out) W0 x without bias.
        a: (r, in), b: (out, r) the LoRA matrices; magnitude: (out,); w0: (out, in).

    Returns:
        (…, out) (m/n − 1) ⊙ W0 x + (m/n) ⊙ s·B A x.
    """
    factor = dora_factor(magnitude, w0.to(x.dtype), (b @ a).to(x.dtype) * scaling)  # (out,)
    lora = F.linear(F.linear(x.to(a.dtype), a), b).to(x.dtype)  # (…, out)
    return (factor - 1) * base_result + factor * lora * scaling


# ----------------------------------------------------------------------------- layer


class DoraLinear(LoraLinear):
    """A LoRA linear layer whose adapters also carry a magnitude vector (DoRA)."""

    adapter_params = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_magnitude_vector = nn.ParameterDict()
        self._norms: dict[str, Tensor] = {}  # merged adapter -> the norm it was merged with

    @classmethod
    def from_lora(cls, layer: LoraLinear) -> DoraLinear:
        """Take over a plain LoRA layer (its base layer and adapters) as a DoRA layer."""
        if type(layer) is not LoraLinear:
            raise SlimtuneError(
                f"DoRA does not support {type(layer).__name__} layers (it needs a plain "
                "Linear/Conv1D layer; embeddings and fused enable_lora slices are not supported)"
            )
        dora = cls(layer.base_layer)
        for attr in ("r", "lora_alpha", "scaling", "use_rslora", "active_adapters", "disabled"):
            setattr(dora, attr, getattr(layer, attr))
        dora.merged_adapters = list(layer.merged_adapters)
        dora.lora_A, dora.lora_B, dora.lora_dropout = layer.lora_A, layer.lora_B, layer.lora_dropout
        return dora

    def w0(self) -> Tensor:
        """The base weight in the (out, in) layout (dequantized for a quantized base)."""
        weight = base_weight(self.base_layer)
        return weight.T if self.fan_in_fan_out else weight

    def init_magnitude(self, name: str) -> None:
        """m = ‖W0 + s·B A‖_row, so that the layer starts as its LoRA (and base) layer."""
        w0 = self.w0().detach()
        delta = self.delta_weight(name).to(w0.device)
        norm = weight_norm(w0.float(), delta).to(self.lora_A[name].weight.dtype)
        self.lora_magnitude_vector[name] = nn.Parameter(norm)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        dora = [n for n in self.active_adapters if n in self.lora_magnitude_vector]
        if self.disabled or self.merged_adapters or not dora:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)  # (…, out) W0 x + bias
        bias = getattr(self.base_layer, "bias", None)
        for name in self.active_adapters:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            if name not in self.lora_magnitude_vector:
                result = result + F.linear(F.linear(x.to(a.dtype), a), b) * self.scaling[name]
                continue
            w0 = self.w0()
            if name in self.lora_dropout and self.training:
                h = self.lora_dropout[name](x)
                base = F.linear(h, w0.to(h.dtype))  # W0 applied to the dropped-out input
            else:
                h, base = x, result if bias is None else result - bias
            magnitude = self.lora_magnitude_vector[name]
            result = result + dora_extra(h, base, a, b, magnitude, w0, self.scaling[name])
        return result

    def merge(self, names: list[str]) -> None:
        for name in [n for n in names if n in self.r]:
            if name not in self.lora_magnitude_vector:
                super().merge([name])
                continue
            if name in self.merged_adapters:
                raise SlimtuneError(f"adapter {name!r} is already merged")
            self._materialize_base()
            weight = self.base_layer.weight
            w0, delta = self.w0().float(), self.delta_weight(name)
            self._norms[name] = torch.linalg.norm(w0 + delta, dim=1)  # (out,)
            merged = dora_weight(w0, delta, self.lora_magnitude_vector[name].detach())
            weight.data = (merged.T if self.fan_in_fan_out else merged).to(weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self._norms:
                self.merged_adapters.append(name)
                super().unmerge()
                continue
            weight = self.base_layer.weight
            factor = self.lora_magnitude_vector[name].detach().float() / self._norms.pop(name)
            w0 = self.w0().float() / factor[:, None] - self.delta_weight(name)
            weight.data = (w0.T if self.fan_in_fan_out else w0).to(weight.dtype)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]


def to_dora(model: nn.Module, adapter_name: str) -> list[str]:
    """Turn every LoRA layer carrying `adapter_name` into a DoRA layer and set its magnitude.

    Returns the names of the converted layers; a SlimtuneError names a layer DoRA cannot take.
    """
    from slimtune.adapters.layers import replace_module
    from slimtune.methods.lora.layers import LoraLayer

    converted = []
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.r:
            continue
        if not isinstance(layer, DoraLinear):
            try:
                dora = DoraLinear.from_lora(layer)
            except SlimtuneError as exc:
                raise SlimtuneError(f"{name}: {exc}") from None
            replace_module(model, name, dora)
            layer = dora
        with torch.no_grad():
            layer.init_magnitude(adapter_name)
        layer.lora_magnitude_vector[adapter_name].requires_grad_(
            adapter_name in layer.active_adapters
        )
        converted.append(name)
    return converted


# ----------------------------------------------------------------------------- registry


def add_dora(model: nn.Module, config, adapter_name: str) -> nn.Module:
    """LoraConfig(use_dora=True): build the LoRA adapter, then give its layers magnitudes."""
    from dataclasses import replace

    from slimtune.methods.lora.inject import add_lora

    model = add_lora(model, replace(config, use_dora=False), adapter_name)
    to_dora(model, adapter_name)
    return model


def export_dora(model: nn.Module, adapter_name: str, config) -> tuple[dict, dict, dict]:
    """PEFT's LoRA file plus `<module>.lora_magnitude_vector` (out,) and "use_dora": true."""
    from slimtune.adapters.peft_keys import PEFT_PREFIX
    from slimtune.methods.lora.peft_format import export_lora

    tensors, fields, metadata = export_lora(model, adapter_name, config)
    for name, layer in model.named_modules():
        if isinstance(layer, DoraLinear) and adapter_name in layer.lora_magnitude_vector:
            magnitude = layer.lora_magnitude_vector[adapter_name]
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = magnitude
    return tensors, {**fields, "use_dora": True}, metadata


def load_dora(model: nn.Module, adapter_name: str, config_json, tensors, metadata) -> nn.Module:
    """Read a PEFT DoRA file: its LoRA part as LoRA, then the magnitudes into DoRA layers."""
    from dataclasses import replace

    from slimtune.adapters.named import adapter_configs
    from slimtune.adapters.peft_keys import PEFT_PREFIX, copy_adapter_tensors
    from slimtune.methods.lora.peft_format import load_lora

    key = ".lora_magnitude_vector"
    magnitudes = {k[len(PEFT_PREFIX) : -len(key)]: v for k, v in tensors.items() if k.endswith(key)}
    rest = {k: v for k, v in tensors.items() if not k.endswith(key)}
    model = load_lora(model, adapter_name, {**config_json, "use_dora": False}, rest, metadata)
    converted = to_dora(model, adapter_name)
    targets = {
        name: model.get_submodule(name).lora_magnitude_vector[adapter_name] for name in converted
    }
    copy_adapter_tensors(targets, magnitudes, "DoRA file (lora_magnitude_vector)")
    config = replace(adapter_configs(model)[adapter_name], use_dora=True)
    model.__dict__["_slimtune_adapters"][adapter_name] = config
    return model


def prepare_dora(model: nn.Module, options: dict) -> nn.Module:
    """`--method dora`: LoRA's flags, with use_dora=True."""
    from dataclasses import replace

    from slimtune.methods.lora.recipe import lora_config
    from slimtune.methods.table import add_adapter

    return add_adapter(model, replace(lora_config(options), use_dora=True))


__all__ = [
    "weight_norm",
    "dora_factor",
    "dora_weight",
    "dora_extra",
    "DoraLinear",
    "to_dora",
    "add_dora",
]
