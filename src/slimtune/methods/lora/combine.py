"""Combining LoRA adapters into a new one, as PEFT's add_weighted_adapter:

"linear" (equal ranks):  A = Σ ±√|w_i s_i| A_i,   B = Σ √|w_i s_i| B_i
"cat"    (ranks add up): A = [w_i s_i A_i],        B = [B_i]
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from torch import nn

from slimtune.adapters.named import adapter_configs
from slimtune.config import LoraConfig
from slimtune.errors import SlimtuneError
from slimtune.methods.lora.layers import LoraEmbedding, LoraFusedLinear, LoraLayer
from slimtune.methods.table import add_adapter


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
