"""`slimtune inspect DIR`: what an adapter directory holds (slimtune- or PEFT-written).

    method       LORA (r=8, lora_alpha=16, scaling 2.0)
    base model   smollm2-135m
    modules      210
      model.layers.*.self_attn.q_proj  ×30  rank 8  lora_A (8, 576)  lora_B (576, 8)
      …
    trainable    1,843,200 parameters
    file size    7.0 MiB (adapter_model.safetensors)

Nothing is loaded but the adapter's own files; no base model is needed.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from torch import Tensor

from slimtune.adapters.peft_keys import PEFT_PREFIX

LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")


def _modules(tensors: dict[str, Tensor]) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module: {part: shape}} for LoRA tensors; other tensors under their own name."""
    grouped: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    for key, value in sorted(tensors.items()):
        key = key.removeprefix(PEFT_PREFIX)
        part = next((p for p in LORA_PARTS if key.endswith("." + p)), None)
        module = key[: -len(part) - 1] if part else key
        grouped[module][part.split(".")[0] if part else "tensor"] = tuple(value.shape)
    return grouped


def _grouped(
    modules: dict[str, dict[str, tuple[int, ...]]], fused: dict
) -> list[tuple[str, int, str]]:
    """Modules that differ only in their layer index, as one line: (pattern, count, detail)."""
    groups: dict[tuple[str, str], int] = {}
    for module, parts in modules.items():
        rank = parts.get("lora_A", parts.get("lora_embedding_A", (None,)))[0]
        detail = (f"  rank {rank}" if rank else "") + "".join(
            f"  {part} {shape}" for part, shape in parts.items()
        )
        if module in fused:
            detail += f"  fused {fused[module]['enable_lora']} r={fused[module]['r']}"
        pattern = re.sub(r"\.\d+\.", ".*.", module)
        groups[(pattern, detail)] = groups.get((pattern, detail), 0) + 1
    return sorted(((p, n, d) for (p, d), n in groups.items()), key=lambda g: g[0])


def _trainable(tensors: dict[str, Tensor], fused: dict) -> int:
    """Parameters the adapter trains (a fused layer stores zero blocks it does not train)."""
    total = 0
    for key, value in tensors.items():
        module = key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0]
        if module in fused and ".lora_B" in key:
            info = fused[module]
            enabled = sum(s for s, e in zip(info["sizes"], info["enable_lora"], strict=True) if e)
            total += enabled * info["r"]
        else:
            total += value.numel()
    return total


def _size(path: Path) -> str:
    size = float(path.stat().st_size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def describe(path: str | Path) -> list[str]:
    """The lines `slimtune inspect` prints."""
    from slimtune.adapter_dir import WEIGHTS_NAME, read_adapter_config, read_adapter_tensors

    config = read_adapter_config(path)
    tensors, metadata = read_adapter_tensors(path)
    fused = json.loads(metadata.get("slimtune.fused", "{}"))
    method = str(config.get("peft_type", "?"))
    if method == "LORA":
        r, alpha = config.get("r"), config.get("lora_alpha")
        rs = bool(config.get("use_rslora"))
        scaling = alpha / (r**0.5 if rs else r) if r and alpha else None
        method += f" (r={r}, lora_alpha={alpha}" + (", rsLoRA" if rs else "")
        method += f", scaling {scaling:g})" if scaling else ")"
        method = "DoRA: " + method if config.get("use_dora") else method
    lines = [f"adapter      {Path(path)}", f"method       {method}"]
    lines.append(f"base model   {config.get('base_model_name_or_path') or '(not recorded)'}")
    if config.get("target_modules") is not None:
        lines.append(f"targets      {config['target_modules']}")
    if config.get("modules_to_save"):
        lines.append(f"saved whole  {', '.join(dict.fromkeys(config['modules_to_save']))}")
    modules = _modules(tensors)
    lines.append(f"modules      {len(modules)}")
    for pattern, count, detail in _grouped(modules, fused):
        lines.append(f"  {pattern}  ×{count}{detail}" if count > 1 else f"  {pattern}{detail}")
    lines.append(f"trainable    {_trainable(tensors, fused):,} parameters")
    lines.append(f"file size    {_size(Path(path) / WEIGHTS_NAME)} ({WEIGHTS_NAME})")
    for key, value in sorted(metadata.items()):
        if key != "slimtune.fused":
            lines.append(f"metadata     {key} = {value}")
    return lines


def run(args: argparse.Namespace) -> int:
    print("\n".join(describe(args.path)))
    return 0
