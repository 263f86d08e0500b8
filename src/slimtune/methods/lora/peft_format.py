"""LoRA adapters as PEFT files: tensors under PEFT's keys and PEFT 0.21's adapter_config.json.

    in the model                                    in adapter_model.safetensors
    model.layers.0.self_attn.q_proj.lora_A.default.weight  ->  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    model.embed_tokens.lora_embedding_A.default            ->  base_model.model.model.embed_tokens.lora_embedding_A
    classifier.modules_to_save.default.weight              ->  base_model.model.classifier.weight

Two layers have no PEFT twin and are written as the plain LoRA that computes the same:
  * a fused layer (enable_lora) as rank n·r with A = [A_1; …; A_n], B block-diagonal with
    zero rows for disabled slices, its rank in rank_pattern and alpha in alpha_pattern
    (alpha·n, or alpha·√n with rsLoRA, so the scaling is unchanged);
  * a PiSSA adapter (trained on W_res = W0 − s·B0 A0) as rank 2r: A = [A; A0], B = [B, −B0],
    so it applies to the original W0 (PEFT's path_initial_model_for_weight_conversion).
The header metadata key "slimtune.fused" records the fused layers so that slimtune reads
them back as fused layers; PEFT ignores it and reads the equivalent plain LoRA.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.adapters.layers import ModulesToSaveWrapper
from slimtune.adapters.named import adapter_configs, delete_adapter, unload
from slimtune.adapters.peft_keys import PEFT_PREFIX, config_from_json
from slimtune.adapters.targets import resolve_targets
from slimtune.config import LoraConfig
from slimtune.errors import SlimtuneError
from slimtune.methods.lora.inject import saved_module_names
from slimtune.methods.lora.layers import LoraEmbedding, LoraFusedLinear, LoraLayer, block_diagonal_b
from slimtune.methods.table import add_adapter

# adapter_config.json fields PEFT 0.21 writes for LORA, with their defaults
PEFT_LORA_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False,
    "lora_dropout": 0.0, "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
    "modules_to_save": None, "monteclora_config": None, "peft_version": "0.21.2", "qalora_group_size": 16,
    "r": 8, "rank_pattern": {}, "revision": None, "target_modules": None, "target_parameters": None,
    "task_type": None, "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}  # fmt: skip
FUSED_KEY = "slimtune.fused"


def _pair_tensors(layer: LoraLayer, name: str) -> tuple[Tensor, Tensor]:
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    if isinstance(layer, LoraFusedLinear):
        return layer.lora_A[name].weight, layer.full_b(name)
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _peft_pair(
    layer: LoraLayer, module: str, name: str, patterns: tuple[dict, dict]
) -> tuple[Tensor, Tensor]:
    """The (A, B) PEFT stores for one layer; rank/alpha overrides go into `patterns`."""
    a, b = _pair_tensors(layer, name)
    r, alpha, rs = layer.r[name], layer.lora_alpha[name], layer.use_rslora[name]
    factor = a.shape[0] // r  # n for a fused layer, 1 otherwise
    pissa = getattr(layer, "pissa_init", {}).get(name)
    if pissa is not None:  # ΔW = s·B A − s·B0 A0 as one rank-2r adapter
        a, b = torch.cat([a, pissa[0]], 0), torch.cat([b, -pissa[1]], 1)
        factor *= 2
    if factor > 1:
        key = re.escape(module)
        patterns[0][key] = r * factor
        patterns[1][key] = alpha * (math.sqrt(factor) if rs else factor)
    return a, b


def _target_modules(model: nn.Module, config: LoraConfig) -> list[str] | str:
    targets = config.target_modules
    if targets is None:
        return sorted(resolve_targets(model, config))
    return targets


def export_lora(model: nn.Module, name: str, config: LoraConfig) -> tuple[dict, dict, dict]:
    """(tensors, adapter_config.json fields, header metadata) of LoRA adapter `name`."""
    tensors: dict[str, Tensor] = {}
    patterns: tuple[dict, dict] = ({}, {})
    fused, fan_in_fan_out = {}, config.fan_in_fan_out
    for module, layer in model.named_modules():
        key = PEFT_PREFIX + module
        if isinstance(layer, LoraLayer) and name in layer.r:
            a, b = _peft_pair(layer, module, name, patterns)
            suffix = ("lora_embedding_A", "lora_embedding_B") if isinstance(layer, LoraEmbedding) else (
                "lora_A.weight", "lora_B.weight")  # fmt: skip
            tensors[f"{key}.{suffix[0]}"], tensors[f"{key}.{suffix[1]}"] = a, b
            fan_in_fan_out = fan_in_fan_out or layer.fan_in_fan_out
            if isinstance(layer, LoraFusedLinear):
                meta = {"enable_lora": layer.enable_lora, "sizes": layer.sizes}
                fused[module] = {**meta, "r": layer.r[name], "lora_alpha": layer.lora_alpha[name]}
            if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                tensors[f"{key}.base_layer.bias"] = layer.base_layer.bias
        elif isinstance(layer, ModulesToSaveWrapper) and name in layer.modules_to_save:
            for k, v in layer.modules_to_save[name].state_dict().items():
                tensors[f"{key}.{k}"] = v
    if config.bias == "all":
        state = model.state_dict()
        tensors.update(
            {
                PEFT_PREFIX + k: v
                for k, v in state.items()
                if k.endswith(".bias") and ".lora_" not in k
            }
        )
    fields = {
        **PEFT_LORA_DEFAULTS, "r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "target_modules": _target_modules(model, config), "exclude_modules": config.exclude_modules,
        "layers_to_transform": config.layers_to_transform, "layers_pattern": config.layers_pattern,
        "modules_to_save": saved_module_names(config), "bias": config.bias, "use_rslora": config.use_rslora,
        "rank_pattern": {**patterns[0], **config.rank_pattern},
        "alpha_pattern": {**patterns[1], **config.alpha_pattern},
        "fan_in_fan_out": fan_in_fan_out, "task_type": config.task_type,
        "init_lora_weights": config.init_lora_weights if config.init_lora_weights in (True, False, "gaussian") else True,
    }  # fmt: skip
    metadata = {FUSED_KEY: json.dumps(fused)} if fused else {}
    return tensors, fields, metadata


def _config_for_load(config_json: dict[str, Any], fused: dict[str, Any]) -> LoraConfig:
    data = dict(config_json)
    for pattern in ("rank_pattern", "alpha_pattern"):
        data[pattern] = {
            k: v
            for k, v in (data.get(pattern) or {}).items()
            if k not in {re.escape(m) for m in fused}
        }
    data["enable_lora"] = {m: f["enable_lora"] for m, f in fused.items()}
    data["init_lora_weights"] = True  # every adapter tensor is overwritten by the file's
    if (
        data.get("modules_to_save") and data.get("task_type") == "SEQ_CLS"
    ):  # PEFT wrote its additions
        data["modules_to_save"] = [
            m for m in data["modules_to_save"] if m not in ("classifier", "score")
        ] or None
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    return config_from_json(LoraConfig, data, known=set(PEFT_LORA_DEFAULTS))


def _model_key(key: str, name: str, layers: dict[str, nn.Module]) -> tuple[str, str]:
    """(module name, model state key) for a file key (PEFT prefix already removed)."""
    for suffix in ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B"):
        if key.endswith("." + suffix):
            module = key[: -len(suffix) - 1]
            part, _, tail = suffix.partition(".")
            return module, f"{module}.{part}.{name}" + (f".{tail}" if tail else "")
    for module, layer in layers.items():
        if isinstance(layer, ModulesToSaveWrapper) and key.startswith(module + "."):
            return module, f"{module}.modules_to_save.{name}.{key[len(module) + 1 :]}"
    return key.rpartition(".")[0], key


def _fused_b(layer: LoraFusedLinear, b: Tensor, module: str) -> Tensor:
    """Back from PEFT's block-diagonal B to the stacked B_j of the enabled slices."""
    r = b.shape[1] // sum(layer.enable_lora)
    rows, j, start = [], 0, 0
    for enabled, size in zip(layer.enable_lora, layer.sizes, strict=True):
        if enabled:
            rows.append(b[start : start + size, j * r : (j + 1) * r])
            j += 1
        start += size
    stacked = torch.cat(rows, 0)
    if not torch.equal(block_diagonal_b(stacked, layer.enable_lora, layer.sizes, r), b):
        raise SlimtuneError(
            f"{module}: lora_B is not block-diagonal over enable_lora={layer.enable_lora}"
        )
    return stacked


def load_lora(
    model: nn.Module, name: str, config_json: dict, tensors: dict, metadata: dict
) -> nn.Module:
    """Add LoRA adapter `name` from PEFT file contents; on any mismatch the model is left as it was."""
    fused = json.loads(metadata.get(FUSED_KEY, "{}"))
    config = _config_for_load(config_json, fused)
    first = not adapter_configs(model)
    model = add_adapter(model, config, name)
    try:
        _copy_tensors(model, name, tensors)
    except SlimtuneError:
        if first:
            unload(model)
        else:
            delete_adapter(model, name)
        raise
    return model


def _copy_tensors(model: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
    layers = dict(model.named_modules())
    state = model.state_dict(keep_vars=True)
    expected = {k for k in state if f".{name}." in k or k.endswith(f".{name}")}
    expected = {k for k in expected if ".lora_" in k or ".modules_to_save." in k}
    for file_key, value in tensors.items():
        if not file_key.startswith(PEFT_PREFIX):
            raise SlimtuneError(f"adapter tensor {file_key!r} does not start with {PEFT_PREFIX!r}")
        module, key = _model_key(file_key[len(PEFT_PREFIX) :], name, layers)
        if key not in state:
            raise SlimtuneError(f"adapter tensor {file_key} has no place in the model (no {key})")
        layer = layers.get(module)
        if isinstance(layer, LoraFusedLinear) and key.endswith(f"lora_B.{name}.weight"):
            value = _fused_b(layer, value, module)
        target = state[key]
        if tuple(value.shape) != tuple(target.shape):
            raise SlimtuneError(
                f"adapter does not fit the model: {module} {key[len(module) + 1 :]} has shape "
                f"{tuple(value.shape)} in the file but {tuple(target.shape)} in the model"
            )
        with torch.no_grad():
            target.copy_(value.to(target.dtype))
        expected.discard(key)
    if expected:
        raise SlimtuneError(
            f"the adapter file lacks {len(expected)} tensors the model needs, e.g. {min(expected)}"
        )
