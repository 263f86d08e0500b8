"""Which modules an adapter config selects: PEFT's target matching, exactly.

Follows peft/tuners/tuners_utils.py (check_target_module_exists) so a config selects the
same modules in both libraries:
  * a list: a module is a target when its full name equals an entry or ends with
    "." + entry;  a string: a full regex match on the full name;  "all-linear": every
    nn.Linear / Conv1D except the output head;  None: the model type's default list.
  * `layers_to_transform` keeps only modules whose first numbered segment (after
    `layers_pattern`, when given) is one of the listed indices.
  * `exclude_modules` (list or regex, same rules) and `modules_to_save` are never targets.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from slimtune.errors import SlimtuneError


def _layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _matches(targets: list[str] | set[str] | str, name: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def is_target(config: Any, name: str, targets: list[str] | set[str] | str) -> bool:
    """PEFT's check_target_module_exists for one module name."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude and _matches(exclude, name):
        return False
    for saved in getattr(config, "modules_to_save", None) or []:
        if re.match(rf"(^|.*\.){saved}($|\..*)", name):
            return False
    if isinstance(targets, str):
        return _matches(targets, name)
    if name in targets:
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(name, getattr(config, "layers_pattern", None))
    return index is not None and index in layers


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, Conv1D, a frozen quantized linear, or an adapter layer wrapping one."""
    module = getattr(module, "base_layer", module)
    linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    return linear or hasattr(module, "dequantize_weight")


def _head_names(model: nn.Module, config: Any) -> set[str]:
    """Output head(s) that "all-linear" leaves alone (PEFT: output embeddings, or a SEQ_CLS head)."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if get_out else None
    if head is None and getattr(config, "task_type", None) == "SEQ_CLS":
        head = next((getattr(model, n) for n in ("score", "classifier") if hasattr(model, n)), None)
    return {name for name, module in model.named_modules() if head is not None and module is head}


def resolve_targets(model: nn.Module, config: Any) -> list[str] | set[str] | str:
    """The target_modules of `config`, with None and "all-linear" made explicit."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise SlimtuneError(
                f"target_modules=None: no default for model type {model_type!r}; give target_modules "
                f"(known defaults: {', '.join(sorted(DEFAULT_TARGET_MODULES))})"
            )
        return list(DEFAULT_TARGET_MODULES[model_type])
    if isinstance(targets, str) and targets.lower() == "all-linear":
        heads = _head_names(model, config)
        return {n for n, m in model.named_modules() if _is_linear(m) and n not in heads}
    return targets


def find_targets(model: nn.Module, config: Any) -> list[str]:
    """Full names of the modules `config` selects; a SlimtuneError when nothing matches.

    An adapter layer already in place is a target itself (a second adapter joins it);
    the modules inside it (base_layer, lora_A, …) never are.
    """
    from slimtune.adapters.layers import is_adapter_layer

    targets = resolve_targets(model, config)
    inside: list[str] = []
    names = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if is_adapter_layer(module):
            inside.append(f"{name}.")
        if is_target(config, name, targets):
            names.append(name)
    if not names:
        leaves = dict.fromkeys(
            n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not list(m.children())
        )
        raise SlimtuneError(
            f"target_modules={config.target_modules!r} matches no module of the model; "
            f"its module names are: {', '.join(leaves)}"
        )
    return names


# PEFT 0.21 TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (subset), plus phi3
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "llama": ["q_proj", "v_proj"],
    "gpt_bigcode": ["c_attn"],
    "falcon": ["query_key_value"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}
