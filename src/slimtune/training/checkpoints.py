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

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from slimtune.atomic import write_failure
from slimtune.errors import SlimtuneError
from slimtune.file_checks import load_safetensors, read_json_file

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
    """Write RUN/checkpoints/step-N atomically, then delete all but the latest `keep`.

    A write the disk refuses (full, I/O error) is a SlimtuneError naming the checkpoint and
    the last complete one, which stays as it was; no temporary directory is left behind.
    """
    root = Path(run_dir) / "checkpoints"
    target = root / f"step-{state['step']:06d}"
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        opt_tensors, opt_rest = optimizer_tensors(optimizer)
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors(), str(tmp / "rng.safetensors"))
        record = with_checksums(tmp, {**state, "optimizer": opt_rest})
        (tmp / "state.json").write_text(json.dumps(record, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except Exception as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        found = [p for p in list_checkpoints(run_dir) if p != target]
        kept = f"the last complete one, {found[-1]}, is intact" if found else "none was written"
        raise SlimtuneError(
            f"cannot write checkpoint {target} ({reason}); {kept}; "
            "free some space and continue with --resume"
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- checksums
#
#   state.json["files"]     {name: sha256 of the file} for every other file of the checkpoint
#   state.json["checksum"]  sha256 of state.json itself without this key (sorted JSON)
#
# A flipped byte in a weight file, or a state.json from another run or model, no longer
# matches: --resume sets that checkpoint aside and continues from the one before it.


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _state_sha256(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def with_checksums(directory: Path, record: dict) -> dict:
    """`record` (state.json) with the checksums of every file already in `directory`."""
    files = {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}
    record = {**record, "files": {k: v for k, v in files.items() if k != "state.json"}}
    return {**record, "checksum": _state_sha256(record)}


def verify_checkpoint(path: Path) -> None:
    """Refuse a checkpoint whose files or state.json differ from what was written."""
    state = read_state(path)
    if "checksum" not in state:
        return  # written before checkpoints carried checksums
    if not isinstance(state.get("files"), dict) or state["checksum"] != _state_sha256(state):
        raise SlimtuneError(f"{path / 'state.json'} was altered (its checksum does not match)")
    for name, digest in state["files"].items():
        file = path / Path(str(name)).name
        if not file.is_file() or file_sha256(file) != digest:
            raise SlimtuneError(f"{file} was altered or is missing (its checksum does not match)")


def set_aside_damaged(run_dir: Path) -> Path:
    """The newest intact checkpoint; newer damaged ones are renamed damaged-step-N, saying so."""
    damaged: list[tuple[Path, SlimtuneError]] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except SlimtuneError as exc:
            damaged.append((path, exc))
            continue
        for bad, exc in damaged:
            aside = bad.with_name(f"damaged-{bad.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(bad, aside)
            print(f"--resume: {exc}; set aside as {aside.name}; resuming from {path.name}",
                  file=sys.stderr)  # fmt: skip
        return path
    if damaged:
        raise SlimtuneError(f"--resume: {damaged[0][1]}; no intact checkpoint to fall back to")
    return latest_checkpoint(run_dir)


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
    state = read_state(path)
    if "optimizer" not in state:
        raise SlimtuneError(f"{path / 'state.json'} has no 'optimizer'; the checkpoint is damaged")
    weights, _ = load_safetensors(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or any(n not in params for n in weights):
        raise SlimtuneError(
            f"checkpoint {path} does not match the model's trainable parameters "
            f"(e.g. {(missing or sorted(set(weights) - set(params)))[0]}); resume with the same settings"
        )
    for name, tensor in weights.items():
        if tensor.shape != params[name].shape or not tensor.dtype.is_floating_point:
            raise SlimtuneError(
                f"checkpoint {path}: {name} is {tuple(tensor.shape)} {tensor.dtype} in the file, "
                f"the model's is {tuple(params[name].shape)}; resume with the same settings"
            )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    opt_tensors, _ = load_safetensors(path / "optimizer.safetensors")
    restore_optimizer_checked(path, optimizer, opt_tensors, state["optimizer"])
    rng, _ = load_safetensors(path / "rng.safetensors")
    restore_rng_checked(path, rng)
    for leftover in path.parent.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return state


STATE_FIELDS = {"step": int, "micro_batches": int, "tokens": int, "elapsed_s": (int, float)}


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, with the fields resume needs checked for type and sign."""
    file = path / "state.json"
    state = read_json_file(file, "checkpoint state")
    if not isinstance(state, dict):
        raise SlimtuneError(f"{file}: not a JSON object; the checkpoint is damaged")
    state.setdefault("tokens", 0)
    state.setdefault("elapsed_s", 0.0)
    for key, kind in STATE_FIELDS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or value < 0:
            raise SlimtuneError(
                f"{file}: {key}={value!r} is not a count; the checkpoint is damaged"
            )
    optimizer = state.get("optimizer", {"param_groups": [], "scalars": {}})
    if not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("param_groups"), list)
        and all(isinstance(g, dict) for g in optimizer["param_groups"])
        and isinstance(optimizer.get("scalars"), dict)
    ):
        raise SlimtuneError(f"{file}: 'optimizer' is damaged (param_groups, scalars)")
    return state


def restore_optimizer_checked(path: Path, optimizer, tensors: dict, rest: dict) -> None:
    """restore_optimizer, with a damaged or foreign optimizer state as one SlimtuneError."""
    keys = list(tensors) + list(rest["scalars"])
    count = sum(len(g["params"]) for g in optimizer.param_groups)
    bad = [k for k in keys if not re.fullmatch(r"\d+\.\w+", k) or int(k.split(".")[0]) >= count]
    bad += [k for k, v in tensors.items() if not v.dtype.is_floating_point]
    if bad:
        raise SlimtuneError(f"{path / 'optimizer.safetensors'}: entry {bad[0]!r} does not fit")
    saved_groups = rest["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups) or any(
        not _same_kinds(saved, live)
        for saved, live in zip(saved_groups, optimizer.param_groups, strict=False)
    ):
        raise SlimtuneError(f"{path / 'state.json'}: optimizer.param_groups do not fit this run")
    try:
        restore_optimizer(optimizer, tensors, rest)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise SlimtuneError(
            f"checkpoint {path}: its optimizer state does not fit this run ({exc!r})"
        ) from None
    groups = [p for g in optimizer.param_groups for p in g["params"]]
    for index, values in optimizer.state.items():
        param = groups[index] if isinstance(index, int) else index
        for name, value in values.items():
            if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                raise SlimtuneError(
                    f"checkpoint {path}: optimizer {name} does not fit its parameter"
                )


def _same_kinds(saved: dict, live: dict) -> bool:
    """A saved param group has the live one's keys with values of the same kinds."""

    def kind(value: Any) -> str:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return type(value).__name__
        if isinstance(value, int | float) or torch.is_tensor(value):
            return "number"
        if isinstance(value, list | tuple):
            return "list:" + ",".join(kind(v) for v in value)
        return type(value).__name__

    if saved.keys() != live.keys() or len(saved["params"]) != len(live["params"]):
        return False
    return all(kind(saved[k]) == kind(live[k]) for k in saved if k != "params") and all(
        isinstance(i, int) and not isinstance(i, bool) for i in saved["params"]
    )


def restore_rng_checked(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    current = torch.get_rng_state()
    found = tensors.get("torch")
    if found is None or found.dtype != torch.uint8 or found.shape != current.shape:
        raise SlimtuneError(f"{path / 'rng.safetensors'}: no valid 'torch' generator state")
    try:
        restore_rng(tensors)
    except RuntimeError as exc:
        raise SlimtuneError(f"{path / 'rng.safetensors'}: not a generator state ({exc})") from None
