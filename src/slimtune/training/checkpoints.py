"""Training checkpoints: everything `--resume` needs to continue bit-identically.

    RUN/checkpoints/step-000020/
        trainable.safetensors   the parameters that train (adapter weights, soft prompt …)
        optimizer.safetensors   AdamW's moments and step counts, one tensor per key
        rng.safetensors         the torch (and CUDA) random-number-generator states
        state.json              step, data position (micro-batches consumed), optimizer
                                groups, tokens seen, elapsed time

A checkpoint is written under a temporary name and renamed into place, so a process
killed at any moment leaves either the whole checkpoint or none of it; the last
`keep` checkpoints stay. Nothing here is pickled: tensors go to safetensors and the
rest to JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.errors import SlimtuneError

STEP_DIR = re.compile(r"^step-(\d+)$")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of every parameter that requires grad."""
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state_dict split into tensors (for safetensors) and the rest (JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, rest: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(rest["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in rest["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = value
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep: int = 2
) -> Path:
    """Write RUN/checkpoints/step-N atomically, then delete all but the latest `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{state['step']:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        opt_tensors, opt_rest = optimizer_tensors(optimizer)
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors(), str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_rest}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary leftovers of a killed run are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise SlimtuneError(
            f"--resume: {Path(run_dir) / 'checkpoints'} holds no checkpoint to resume from "
            "(run without --resume, or with --save-every N so that checkpoints are written)"
        )
    return found[-1]


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load trainable weights, optimizer and RNG states in place; return the saved state."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or any(n not in params for n in weights):
        raise SlimtuneError(
            f"checkpoint {path} does not match the model's trainable parameters "
            f"(e.g. {(missing or sorted(set(weights) - set(params)))[0]}); resume with the same settings"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    state = json.loads((path / "state.json").read_text())
    restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    restore_rng(load_file(str(path / "rng.safetensors")))
    for leftover in path.parent.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return state
