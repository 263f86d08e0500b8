"""Training on several processes: torchrun starts them, FSDP2 shards the model across them.

Fully Sharded Data Parallel: Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully
Sharded Data Parallel", arXiv:2304.11277 (FSDP2 is `torch.distributed.fsdp.fully_shard`).
Each of the W processes keeps 1/W of every parameter (the frozen base, 4-bit codes and
their statistics included, and the adapters); a decoder layer's parameters are gathered
whole just before it runs and dropped again after, and gradients are summed and split
back into shards (reduce-scatter):

    rank r:  micro-batches r, r+W, r+2W, …  of the one-process stream (same seed, same order)
             layer l: all-gather(shards of l) ─► forward/backward ─► reduce-scatter(∂ adapters)
    step:    loss = Σ_ranks Σ token losses / Σ_ranks label tokens       (as one process)
             θ_shard ← AdamW(θ_shard, clip(g_shard, over the whole gradient's norm))

With one process (torchrun --nproc-per-node 1) there is nothing to split: the frozen
weights stay whole on the device, outside FSDP (sharding them over one rank would only
copy the whole model every step and hold it twice), and the trainable parameters form
one FSDP2 unit (one gather per step, one reduce for the gradients).

So W processes with `--grad-accum A` take the same steps as one process with
`--grad-accum A·W`: the global batch is batch_size · A · W rows. Rank 0 alone prints and
writes files; the final adapter is gathered whole onto rank 0 and written as the same
PEFT directory a one-process run writes. Checkpoints (distributed_checkpoint.py) use
torch.distributed.checkpoint, so a run resumes on any number of processes.

    torchrun --nproc-per-node 2 -m slimtune train --model M --data D --out RUN
    slimtune train --nproc 2 --model M --data D --out RUN        # starts torchrun itself
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from slimtune.errors import SlimtuneError
from slimtune.training.runlog import MetricsLog

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# ----------------------------------------------------------------------------- process group


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (torch.distributed.run) started."""
    return all(key in os.environ for key in TORCHRUN_ENV)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Only rank 0 prints and writes files."""
    return rank() == 0


def init_from_env(device: str | None = None) -> bool:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU); False when not under it."""
    if not launched_by_torchrun() or is_distributed():
        return is_distributed()
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        local, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= count:
            raise SlimtuneError(
                f"process {local} has no GPU of its own ({count} found): start at most {count} "
                "processes per node, or train on the CPU with --config holding 'device: cpu'"
            )
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def shutdown() -> None:
    """Leave the process group once every process is done with it: a rank that tears its
    connections down while another still uses them can abort that one at exit."""
    if is_distributed():
        barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_sum(value: float) -> float:
    """The sum of `value` over every process (the value itself in one process)."""
    if not is_distributed():
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item())


# ----------------------------------------------------------------------------- launching


def train_argv(args: Any) -> list[str]:
    """The `slimtune train` flags of a parsed command line, without --nproc."""
    argv = []
    for key, value in vars(args).items():
        if key in ("command", "nproc") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def launch(args: Any) -> int:
    """`slimtune train --nproc N …`: run `torchrun --nproc-per-node N -m slimtune train …`."""
    if launched_by_torchrun():
        raise SlimtuneError("--nproc is not accepted under torchrun: torchrun already started it")
    if args.nproc < 1:
        raise SlimtuneError(
            f"--nproc {args.nproc} is not accepted: give a number of processes >= 1"
        )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc}", "-m", "slimtune", "train", *train_argv(args)]  # fmt: skip
    return subprocess.run(command, check=False).returncode


# ----------------------------------------------------------------------------- sharding


def shardable_quant_storage(model: nn.Module) -> int:
    """Turn each QuantLinear's stored weight (flat 4-bit codes, absmax, …) into frozen
    parameters, which FSDP2 shards like any other (it leaves buffers whole on every rank).
    Each holds its bytes as flat bf16 (QuantLinear.store_as_parameters): FSDP2 makes its
    shards Parameters, and in torch 2.11 that fails for uint8 ("only Tensors of floating
    point dtype can require gradients"). Returns how many tensors moved."""
    return sum(
        len(module.store_as_parameters())
        for module in model.modules()
        if hasattr(module, "store_as_parameters")
    )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model (transformers decoder layers, or any ModuleList's items)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    return list(max(lists, key=len)) if lists else []


def shard_model(
    model: nn.Module, device: torch.device, frozen_whole: bool | None = None
) -> nn.Module:
    """FSDP2 in place. Several processes: one unit per decoder layer, then the root
    (embeddings, norm, head), every parameter sharded. `frozen_whole` (default: with one
    process) leaves the frozen weights whole on the device, outside FSDP, and makes the
    trainable parameters one unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    if frozen_whole is None:
        frozen_whole = world_size() == 1
    if frozen_whole:
        frozen = {p for p in model.parameters() if not p.requires_grad}
        fully_shard(model.to(device), mesh=mesh, reshard_after_forward=False,
                    ignored_params=frozen)  # fmt: skip
    else:
        shardable_quant_storage(model)  # no mixed-precision policy: nothing casts its bytes
        reshard = world_size() > 1  # one process: gather once per step, not again in backward
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # sum the gradients (the loss is already averaged
            module.set_gradient_divide_factor(1.0)  # over every rank's tokens), with plain
            module.set_force_sum_reduction_for_comms(True)  # sums (gloo has no pre-scaled op)
    return model


def sharded_loss(model: nn.Module, loss_fn: Callable) -> Callable:
    """loss_fn run as a method of the sharded root, so FSDP gathers the root's parameters
    (embeddings, output layer) even when the loss calls the decoder and head directly."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    model._slimtune_loss = functools.partial(loss_fn, model)
    register_fsdp_forward_method(model, "_slimtune_loss")

    def run(model: nn.Module, batch: dict[str, Tensor], chunk: int) -> tuple[Tensor, int]:
        loss_sum, count = model._slimtune_loss(batch, chunk)
        if count == 0 and torch.is_grad_enabled():  # no label in this rank's micro-batch: the
            loss_sum = _zero_through_model(model, batch)  # other ranks' collectives need ours
        return loss_sum, count

    return run


def _zero_through_model(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """0 · Σ outputs: a forward and backward through every layer that changes nothing."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float().sum() * 0.0


def place_model(
    model: nn.Module, device: torch.device, loss_fn: Callable
) -> tuple[nn.Module, Callable]:
    """(model on `device`, loss_fn); under torchrun the model is sharded with FSDP2 in place."""
    if not is_distributed():
        return model.to(device), loss_fn
    model = shard_model(model, device)
    barrier()  # every rank has checked the run directory before rank 0 writes into it
    return model, sharded_loss(model, loss_fn)


def sync_gradients(model: nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients on this backward (the last micro-batch of a step) or not."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


@contextlib.contextmanager
def gathered_root(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluation calls the decoder and the head directly: gather the root's parameters."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


# ----------------------------------------------------------------------------- data, logs


def rank_share(batches: Iterator[dict]) -> Iterator[dict]:
    """This rank's micro-batches: numbers rank, rank + W, rank + 2W, … of the global stream."""
    return itertools.islice(batches, rank(), None, world_size())


class _MirrorLog(MetricsLog):
    """metrics.jsonl as seen by ranks other than 0: the same records, kept in memory."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._kept: list[dict[str, Any]] = []

    def append(self, record: dict[str, Any]) -> None:
        self._kept.append(record)

    def records(self) -> list[dict[str, Any]]:
        return list(self._kept)

    def truncate_after(self, step: int) -> None:
        self._kept = [r for r in MetricsLog(self.path).records() if r.get("step", 0) <= step]


def metrics_log(path: Path) -> MetricsLog:
    """RUN/metrics.jsonl on rank 0; an in-memory copy elsewhere (same records, no writes)."""
    return MetricsLog(path) if is_main() else _MirrorLog(path)


def parameter_counts(model: nn.Module, counts: tuple[int, int]) -> tuple[int, int]:
    """(trainable, total) without the quantized storage that sharding made parameters."""
    extra = sum(
        module._parameters[name].numel()
        for module in model.modules()
        for name in getattr(module, "_as_bytes", {})
        if module._parameters.get(name) is not None
    )
    return counts[0], counts[1] - extra


# ----------------------------------------------------------------------------- saving


@contextlib.contextmanager
def whole_trainable(model: nn.Module) -> Iterator[nn.Module]:
    """On rank 0, every trainable parameter gathered whole (on the CPU) in place of its shard.

    Every rank must enter (gathering is collective); the shards are back on exit.
    """
    from torch.distributed.tensor import DTensor

    gathered: dict[int, nn.Parameter] = {}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.requires_grad or not isinstance(param, DTensor):
                continue
            if id(param) not in gathered:
                full = param.detach().full_tensor().cpu()  # collective: every rank, same order
                if tuple(full.shape) != tuple(param.shape) or full.numel() != param.numel():
                    raise RuntimeError(f"gathered {name} has shape {tuple(full.shape)}")
                gathered[id(param)] = nn.Parameter(full, requires_grad=True)
            swapped.append((module, name, param))
    try:
        if is_main():
            for module, name, param in swapped:
                module._parameters[name] = gathered[id(param)]
        yield model
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def save_final(save_fn: Callable, model: nn.Module, directory: Path) -> Any:
    """save_fn(model, directory) on rank 0 with the whole adapter; the others wait."""
    if not is_distributed():
        return save_fn(model, directory)
    result = None
    with whole_trainable(model):
        if is_main():
            result = save_fn(model, directory)
    barrier()
    return result
