"""LoRA as a method: building LoraConfig adapters into a model, and combining adapters.

    add_lora(model, config, name)
      for each target module (inject.find_targets, PEFT's matching):
          r, alpha  <- rank_pattern / alpha_pattern (first regex key matching the name's tail)
          Linear / Conv1D      -> LoraLinear
          name in enable_lora  -> LoraFusedLinear (only the chosen slices of a fused projection)
          Embedding            -> LoraEmbedding
      modules_to_save -> ModulesToSaveWrapper (PEFT adds "classifier", "score" for SEQ_CLS)
      freeze everything else; biases train as `bias` says ("none", "all", "lora_only")

Registered with inject.register_method for LoraConfig; the PEFT file format lives in
lora_format.py. `add_weighted_adapter` combines adapters as PEFT's does: "linear" (equal
ranks: A = Σ ±√|w_i s_i| A_i, B = Σ √|w_i s_i| B_i) or "cat" (A = [w_i s_i A_i], B = [B_i]).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from torch import nn

from slimtune.config import LoraConfig
from slimtune.errors import SlimtuneError
from slimtune.inject import (
    ModulesToSaveWrapper,
    adapter_configs,
    add_adapter,
    find_targets,
    freeze_all,
    register_method,
    replace_module,
    wrap_modules_to_save,
)
from slimtune.lora import LoraEmbedding, LoraFusedLinear, LoraLayer, LoraLinear


def pattern_value(patterns: dict[str, float], name: str, default: float) -> float:
    """PEFT's get_pattern_key: the first key K with re.match(r"(.*\\.)?(K)$", name) wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def fused_mask(config: LoraConfig, name: str) -> list[bool] | None:
    for key, mask in config.enable_lora.items():
        if name == key or name.endswith(f".{key}"):
            return list(mask)
    return None


def slice_sizes(model: nn.Module, out_features: int, k: int) -> list[int] | None:
    """Output sizes of a fused q/k/v projection under grouped-query attention (Phi-3 style):
    [heads·head_dim, kv_heads·head_dim, kv_heads·head_dim]; None means k equal slices."""
    cfg = getattr(model, "config", None)
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    if k != 3 or not heads or not kv or heads == kv:
        return None
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    sizes = [heads * head_dim, kv * head_dim, kv * head_dim]
    return sizes if sum(sizes) == out_features else None


def _new_layer(model: nn.Module, module: nn.Module, name: str, config: LoraConfig) -> LoraLayer:
    mask = fused_mask(config, name)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    linear_like = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    linear_like = linear_like or (
        hasattr(module, "in_features") and hasattr(module, "dequantize_weight")
    )
    if not linear_like:
        raise SlimtuneError(
            f"target module {name} is a {type(module).__name__}; LoRA adapts Linear, Conv1D and Embedding layers"
        )
    if not mask:
        return LoraLinear(module)
    out_features = getattr(module, "out_features", None) or module.weight.shape[-1]
    return LoraFusedLinear(module, mask, slice_sizes(model, out_features, len(mask)))


def saved_module_names(config: LoraConfig) -> list[str] | None:
    """modules_to_save, with PEFT's additions for sequence classification."""
    names = list(config.modules_to_save or [])
    if config.task_type == "SEQ_CLS":
        names += ["classifier", "score"]
    return names or None


def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str) -> nn.Module:
    """Wrap every target module of `config` in a LoRA layer and add adapter `adapter_name`."""
    if config.use_dora:  # reached when slimtune.dora was not imported yet (it registers itself)
        from slimtune.dora import add_dora

        return add_dora(model, config, adapter_name)
    for name in find_targets(model, config):
        module = model.get_submodule(name)
        layer = module if isinstance(module, LoraLayer) else _new_layer(model, module, name, config)
        r = int(pattern_value(config.rank_pattern, name, config.r))
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        layer.add_adapter(
            adapter_name,
            r,
            alpha,
            dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init=config.init_lora_weights,
        )
        if layer is not module:
            replace_module(model, name, layer)
    wrap_modules_to_save(model, saved_module_names(config), adapter_name)
    freeze_all(model)
    _train_biases(model, config.bias)
    return model


def _train_biases(model: nn.Module, bias: str) -> None:
    if bias == "all":
        for name, param in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                param.requires_grad_(True)
    elif bias == "lora_only":
        for module in model.modules():
            if (
                isinstance(module, LoraLayer)
                and getattr(module.base_layer, "bias", None) is not None
            ):
                module.base_layer.bias.requires_grad_(True)


register_method(LoraConfig, add_lora)


# ----------------------------------------------------------------------------- combining


def _pair(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _combine(layer: LoraLayer, adapters: list[str], weights: list[float], kind: str):
    """(A, B, rank) of the combined adapter on one layer (scaling 1)."""
    pairs = [
        (_pair(layer, a), w * layer.scaling[a]) for a, w in zip(adapters, weights, strict=True)
    ]
    if kind == "linear":
        a = sum(math.copysign(math.sqrt(abs(ws)), ws) * pa.detach() for (pa, _), ws in pairs)
        b = sum(math.sqrt(abs(ws)) * pb.detach() for (_, pb), ws in pairs)
        return a, b, layer.r[adapters[0]]
    if isinstance(layer, LoraFusedLinear):
        raise SlimtuneError(
            "combination_type='cat' is not available for fused layers (enable_lora)"
        )
    cat_a = torch.cat([pa.detach() * ws for (pa, _), ws in pairs], dim=0)  # (Σr, in)
    cat_b = torch.cat([pb.detach() for (_, pb), _ in pairs], dim=1)  # (out, Σr)
    return cat_a, cat_b, cat_a.shape[0]


def _pick_combination(layers: dict[str, LoraLayer], adapters: list[str], kind: str | None) -> str:
    if kind is None:
        same = all(
            set(adapters) <= set(m.r) and len({m.r[a] for a in adapters}) == 1
            for m in layers.values()
        )
        kind = "linear" if same else "cat"
    if kind not in ("linear", "cat"):
        raise SlimtuneError(f"combination_type={kind!r} is not accepted: 'linear' or 'cat'")
    for name, layer in layers.items():
        ranks = [layer.r[a] for a in adapters if a in layer.r]
        if kind == "linear" and len(set(ranks)) > 1:
            raise SlimtuneError(f"combination_type='linear' needs equal ranks; {name} has {ranks}")
    return kind


def _combined_config(first: LoraConfig, ranks: dict[str, int], layers: dict[str, LoraLayer]):
    """The config of a combined adapter: these modules, these ranks, scaling 1 (alpha = r)."""
    patterns = {re.escape(n): r for n, r in ranks.items()}
    fused = {n: m.enable_lora for n, m in layers.items() if isinstance(m, LoraFusedLinear)}
    return dataclasses.replace(
        first, target_modules=list(ranks), rank_pattern=patterns, alpha_pattern=dict(patterns),
        use_rslora=False, modules_to_save=None, layers_to_transform=None, exclude_modules=None,
        enable_lora=fused, init_lora_weights=True, task_type=None,
    )  # fmt: skip


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str | None = None,
) -> nn.Module:
    """Add `adapter_name` = a weighted combination of LoRA adapters, as PEFT's add_weighted_adapter.

    combination_type: "linear" (all ranks equal on every layer), "cat" (ranks add up), or
    None: "linear" when the ranks allow it, "cat" otherwise.
    """
    configs = adapter_configs(model)
    missing = [a for a in adapters if a not in configs]
    if missing or len(adapters) != len(weights) or not adapters:
        raise SlimtuneError(
            f"add_weighted_adapter: unknown adapters {missing} or not one weight each"
        )
    if any(not isinstance(configs[a], LoraConfig) for a in adapters):
        raise SlimtuneError("add_weighted_adapter combines LoRA adapters only")
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer) and set(adapters) & set(m.r)
    }
    kind = _pick_combination(layers, adapters, combination_type)
    combined = {}
    for name, layer in layers.items():
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.r]
        combined[name] = _combine(layer, [a for a, _ in present], [w for _, w in present], kind)
    ranks = {name: rank for name, (_, _, rank) in combined.items()}
    add_adapter(model, _combined_config(configs[adapters[0]], ranks, layers), adapter_name)
    with torch.no_grad():
        for name, (a, b, _) in combined.items():
            pa, pb = _pair(layers[name], adapter_name)
            pa.copy_(a)
            pb.copy_(b)
    return model


__all__ = ["add_lora", "add_weighted_adapter", "pattern_value", "ModulesToSaveWrapper"]
