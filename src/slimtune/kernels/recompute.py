"""Activation checkpointing per decoder layer, with optional offload to CPU memory.

Training Deep Nets with Sublinear Memory Cost, Chen et al. 2016, arXiv:1604.06174.
Only each layer's input is kept; backward runs the layer again, under the same random
state, and back-propagates through that recomputation:

    forward:   h_{l+1} = layer_l(h_l)      (no graph kept; h_l saved, or copied to CPU)
    backward:  h_l (back on the GPU) ──► layer_l again, with grad ──► ∂/∂h_l, ∂/∂adapters

(the same random state and the same autocast state as the forward pass)

With `offload=True` the saved inputs go to pinned CPU memory (asynchronously), so the
GPU holds one layer's activations at a time instead of one input per layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

_PROBE: list[tuple[int, int]] | None = None  # (bytes kept by one layer's forward, tokens)


def probe_activations(record: list[tuple[int, int]] | None) -> None:
    """Start (a list) or stop (None) recording, for each layer recomputed on a GPU, how many
    bytes its forward keeps for backward (its output aside) and for how many tokens: what that
    layer would hold through the whole step if it were not recomputed (training/memory.py)."""
    global _PROBE
    _PROBE = record


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: Callable[[Tensor], Tensor], offload: bool, hidden: Tensor, _token):
        ctx.run, ctx.device, ctx.hidden_grad = run, hidden.device, hidden.requires_grad
        ctx.rng = _rng_state(hidden.device)
        device = hidden.device.type  # the recomputation runs under the same autocast state
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if offload and hidden.is_cuda:
            saved = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            saved.copy_(hidden, non_blocking=True)
            ctx.cpu_hidden = saved
        else:
            ctx.cpu_hidden = None
            ctx.save_for_backward(hidden)
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, grad):
        if ctx.cpu_hidden is not None:
            hidden = ctx.cpu_hidden.to(ctx.device, non_blocking=True)
        else:
            (hidden,) = ctx.saved_tensors
        hidden = hidden.detach().requires_grad_(ctx.hidden_grad)
        cpu_state, cuda_state = ctx.rng
        devices = [ctx.device] if cuda_state is not None else []
        device, enabled, dtype = ctx.autocast
        autocast = torch.autocast(device, dtype=dtype, enabled=enabled)
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), autocast:
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, ctx.device)
            probe = _PROBE is not None and hidden.is_cuda
            before = torch.cuda.memory_allocated(ctx.device) if probe else 0
            out = ctx.run(hidden)
            if probe:  # the output is the next layer's input, kept in any case: not counted
                used = torch.cuda.memory_allocated(ctx.device) - before - out.nbytes
                _PROBE.append((used, hidden.shape[:-1].numel()))
        torch.autograd.backward(out, grad)
        return None, None, hidden.grad, None


def checkpoint(run: Callable[..., Tensor], hidden: Tensor, *args, offload: bool = False) -> Tensor:
    """`run(hidden, *args)` with only `hidden` kept for backward (other args are constants).

    The signature matches transformers' `_gradient_checkpointing_func(fn, *args)`.
    """
    # `token` requires grad so the output does even when `hidden` does not (the layer's
    # adapters train); transformers' checkpointing needs enable_input_require_grads instead.
    token = torch.empty(0, device=hidden.device, requires_grad=True)
    return _Checkpoint.apply(lambda h: run(h, *args), offload, hidden, token)


def enable_checkpointing(model: nn.Module, offload: bool = False, fraction: float = 1.0) -> int:
    """Checkpoint transformers decoder layers of `model`; returns how many.

    Uses transformers' GradientCheckpointingLayer hook (each layer calls
    `_gradient_checkpointing_func(forward, hidden_states)` when enabled and training).
    `fraction` < 1 checkpoints only that share of the layers, spread evenly (memory is
    traded for the recomputation of the rest).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    def func(run, hidden, *args):
        return checkpoint(run, hidden, *args, offload=offload)

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    chosen = (
        {round(i / fraction) for i in range(round(len(layers) * fraction))} if fraction else set()
    )
    for index, module in enumerate(layers):
        module.gradient_checkpointing = index in chosen
        module._gradient_checkpointing_func = func
    if hasattr(model, "config"):
        model.config.use_cache = False
    return len(chosen)
