"""Checkpoints that resume on any number of processes (torch.distributed.checkpoint, DCP).

A run under torchrun writes each rank's shards of the trainable parameters and of
AdamW's moments into one DCP directory; DCP records where every slice of every tensor
lives, so a reader with a different number of processes (one included, with no process
group at all) loads exactly the slices it owns:

    RUN/checkpoints/step-000020/
        .metadata, __0_0.distcp, __1_0.distcp   DCP: {"model": trainable, "optim": AdamW}
        rng-0.safetensors, rng-1.safetensors    each rank's random-number-generator state
        state.json                              step, micro-batches consumed, world_size, …

A one-process run writes checkpoint.py's safetensors layout instead; both load here,
whatever the number of processes now. A resumed run keeps the checkpoint's global
batch: with W processes now, grad_accum becomes (micro-batches per step) / W.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from slimtune.config import TrainConfig
from slimtune.errors import SlimtuneError
from slimtune.file_checks import load_safetensors
from slimtune.training import checkpoints as checkpoint
from slimtune.training.distributed import barrier, is_distributed, is_main, rank, world_size

DCP_METADATA = ".metadata"


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"model": trainable parameters, "optim": AdamW state}, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model_sd = {k: v for k, v in model_sd.items() if k in trainable}  # no buffers
    return {"model": model_sd, "optim": optim_sd}


def save_checkpoint(
    run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep: int = 2
) -> Path:
    """RUN/checkpoints/step-N: checkpoint.py's layout in one process, DCP under torchrun."""
    if not is_distributed():
        return checkpoint.save_checkpoint(run_dir, model, optimizer, state, keep)
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / "checkpoints"
    target, tmp = root / f"step-{state['step']:06d}", root / f".tmp-step-{state['step']:06d}"
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp))
    save_file(checkpoint.rng_tensors(), str(tmp / f"rng-{rank()}.safetensors"))
    barrier()
    if is_main():
        record = checkpoint.with_checksums(
            tmp, {**state, "world_size": world_size(), "format": "dcp"}
        )
        (tmp / "state.json").write_text(json.dumps(record, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        for old in checkpoint.list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return target


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load trainable weights, AdamW state and RNG state in place (any layout, any W)."""
    if not (path / DCP_METADATA).is_file() and not is_distributed():
        return checkpoint.load_checkpoint(path, model, optimizer)
    if (path / DCP_METADATA).is_file():
        state = _load_dcp(path, model, optimizer)
    else:
        state = _load_whole_into_shards(path, model, optimizer)
    barrier()
    if is_main():  # what a save cut short by a kill left behind
        for leftover in path.parent.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return state


def _load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A DCP checkpoint, written by any number of processes, into this one's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = checkpoint.read_state(path)
    loaded = _state_dicts(model, optimizer)
    _check_matches(path, loaded["model"])
    with warnings.catch_warnings():  # DCP warns that it loads in one process: we meant that
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(loaded, checkpoint_id=str(path), no_dist=not is_distributed())
    set_state_dict(model, optimizer, model_state_dict=loaded["model"],
                   optim_state_dict=loaded["optim"], options=_options())  # fmt: skip
    own = path / f"rng-{rank()}.safetensors"
    same_world = state.get("world_size") == world_size() and own.is_file()
    checkpoint.restore_rng_checked(
        path, load_safetensors(own if same_world else path / "rng-0.safetensors")[0]
    )
    return state


def _check_matches(path: Path, trainable: dict) -> None:
    """The checkpoint holds exactly the model's trainable parameters, with their shapes."""
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    names = {f"model.{n}" for n in trainable} | {k for k in saved if k.startswith("model.")}
    for key in sorted(names):
        tensor, meta = trainable.get(key.removeprefix("model.")), saved.get(key)
        if tensor is None or meta is None or tuple(meta.size) != tuple(tensor.shape):
            raise SlimtuneError(
                f"checkpoint {path} does not match the model's trainable parameters "
                f"(e.g. {key.removeprefix('model.')}); resume with the same settings"
            )


def _load_whole_into_shards(path: Path, model: nn.Module, optimizer) -> dict:
    """A one-process checkpoint (whole tensors, AdamW state by index) into sharded training."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = checkpoint.read_state(path)
    weights, _ = load_safetensors(path / "trainable.safetensors")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if sorted(names) != sorted(weights):
        raise SlimtuneError(
            f"checkpoint {path} does not match the model's trainable parameters; "
            "resume with the same settings"
        )
    saved = state["optimizer"]
    per_param: dict[str, dict] = {}
    tensors, _ = load_safetensors(path / "optimizer.safetensors")
    for key, value in list(tensors.items()) + list(saved["scalars"].items()):
        index, field = key.split(".", 1)
        per_param.setdefault(names[int(index)], {})[field] = value
    groups = [
        {**g, "betas": tuple(g["betas"]), "params": [names[i] for i in g["params"]]}
        for g in saved["param_groups"]
    ]
    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
    set_state_dict(model, optimizer, model_state_dict=weights,
                   optim_state_dict={"state": per_param, "param_groups": groups},
                   options=options)  # fmt: skip
    checkpoint.restore_rng_checked(path, load_safetensors(path / "rng.safetensors")[0])
    return state


def intact_for_resume(run_dir: Path) -> None:
    """Before a resume: damaged checkpoints are set aside (checkpoints.set_aside_damaged), so
    that every process then reads the newest intact one."""
    if is_main():
        checkpoint.set_aside_damaged(run_dir)
    barrier()


def keep_global_batch(config: TrainConfig, run_dir: Path, resume: bool) -> TrainConfig:
    """On resume, grad_accum such that grad_accum × processes equals the checkpoint's
    micro-batches per step (the global batch, and so the steps, stay those of the run)."""
    if not resume:
        return config
    state = json.loads((checkpoint.latest_checkpoint(run_dir) / "state.json").read_text())
    per_step = state["micro_batches"] // max(state["step"], 1)
    world = world_size()
    if per_step == config.grad_accum * world:
        return config
    if per_step % world:
        raise SlimtuneError(
            f"--resume: the checkpoint's global batch is {per_step} micro-batches per step, "
            f"which {world} processes cannot share evenly; resume with a number of processes "
            f"dividing {per_step}"
        )
    if is_main():
        print(
            f"resuming on {world} process(es): --grad-accum {per_step // world} keeps the "
            f"checkpoint's {per_step} micro-batches per step",
            file=sys.stderr,
        )
    return dataclasses.replace(config, grad_accum=per_step // world)
