"""Activation checkpointing per decoder layer, with optional offload to CPU memory.

Training Deep Nets with Sublinear Memory Cost, Chen et al. 2016, arXiv:1604.06174.
Only each layer's input is kept; backward runs the layer again, under the same random
state, and back-propagates through that recomputation:

    forward:   h_{l+1} = layer_l(h_l)      (no graph kept; h_l saved, or copied to CPU)
    backward:  h_l (back on the GPU) ──► layer_l again, with grad ──► ∂/∂h_l, ∂/∂adapters

(the same random state and the same autocast state as the forward pass)

With `offload=True` the saved inputs go to pinned CPU memory, so the GPU holds one layer's
activations at a time instead of one input per layer. The copies run on a side stream, so
they overlap the layers' compute: the forward's copy out waits only for the input it
copies, and backward fetches layer l−1's input while layer l recomputes and back-propagates:

    compute stream:  … layer l forward │ layer l+1 forward …      … backward l │ backward l−1
    copy stream:           h_l ──► CPU                               h_{l−1} ──► GPU

During recomputation `recomputing()` is True: a layer whose last projection's output only
feeds the residual sum (kernels/llama_ops.py) then skips that projection's base GEMM, whose
values backward never reads.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

_PROBE: list[tuple[int, int, int]] | None = None  # (bytes a layer keeps, tokens, input bytes)
_RECOMPUTING = False  # inside a checkpointed layer's recomputation (backward)
_STREAMS: dict[torch.device, torch.cuda.Stream] = {}  # the offload copy stream of each GPU
_LAST: weakref.ref | None = None  # the input offloaded last (the next one's predecessor)


def recomputing() -> bool:
    """True while a checkpointed layer runs again in backward (its output is not read)."""
    return _RECOMPUTING


def probe_activations(record: list[tuple[int, int, int]] | None) -> None:
    """Start (a list) or stop (None) recording, for each layer recomputed on a GPU, how many
    bytes its forward keeps for backward (its output aside), for how many tokens, and the
    bytes of its input: what that layer would hold through the whole step if it were not
    recomputed, and what its checkpoint holds (training/memory.py)."""
    global _PROBE
    _PROBE = record


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class _Offloaded:
    """One layer's input in pinned CPU memory, and its way back to the GPU (on the copy stream)."""

    def __init__(self, hidden: Tensor) -> None:
        global _LAST  # weak links: a graph that is never back-propagated frees its inputs
        self.device, self.prev, _LAST = hidden.device, _LAST, weakref.ref(self)
        stream = _copy_stream(hidden.device)
        stream.wait_stream(torch.cuda.current_stream(hidden.device))  # hidden is written
        self.cpu: Tensor | None = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            self.cpu.copy_(hidden, non_blocking=True)
        hidden.record_stream(stream)  # its memory is not reused before the copy has read it
        self.gpu: Tensor | None = None
        self.ready: torch.cuda.Event | None = None

    def prefetch(self) -> None:
        """Start the copy back to the GPU, unless it started or the input was used already."""
        if self.cpu is None or self.gpu is not None:
            return
        stream = _copy_stream(self.device)
        with torch.cuda.stream(stream):
            self.gpu = self.cpu.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def fetch(self) -> Tensor:
        """The input on the GPU, usable on the current stream; starts the previous one's copy."""
        self.prefetch()
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(self.ready)
        hidden, self.gpu, self.cpu = self.gpu, None, None
        hidden.record_stream(compute)
        previous = self.prev() if self.prev is not None else None
        if previous is not None:
            previous.prefetch()  # layer l−1's input travels while layer l recomputes
        return hidden


def _recompute(run: Callable[[Tensor], Tensor], hidden: Tensor) -> Tensor:
    global _RECOMPUTING
    _RECOMPUTING = True
    try:
        return run(hidden)
    finally:
        _RECOMPUTING = False


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: Callable[[Tensor], Tensor], offload: bool, hidden: Tensor, _token):
        ctx.run, ctx.device, ctx.hidden_grad = run, hidden.device, hidden.requires_grad
        ctx.rng = _rng_state(hidden.device)
        device = hidden.device.type  # the recomputation runs under the same autocast state
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if offload and hidden.is_cuda:
            ctx.offloaded = _Offloaded(hidden)
        else:
            ctx.offloaded = None
            ctx.save_for_backward(hidden)
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, grad):
        if ctx.offloaded is not None:
            hidden = ctx.offloaded.fetch()
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
            out = _recompute(ctx.run, hidden)
            if probe:  # the output is the next layer's input, kept in any case: not counted
                used = torch.cuda.memory_allocated(ctx.device) - before - out.nbytes
                _PROBE.append((used, hidden.shape[:-1].numel(), hidden.nbytes))
        torch.autograd.backward(out, grad)
        return None, None, hidden.grad, None


def checkpoint(run: Callable[..., Tensor], hidden: Tensor, *args, offload: bool = False) -> Tensor:
    """`run(hidden, *args)` with only `hidden` kept for backward (other args are constants).

    The signature matches transformers' `_gradient_checkpointing_func(fn, *args)`.
    """
    # `token` requires grad so the output does even when `hidden` does not (the layer's
    # adapters train); transformers' checkpointing needs enable_input_require_grads instead.
    if not torch.is_grad_enabled():  # no backward will come: nothing to keep or recompute
        return run(hidden, *args)
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
