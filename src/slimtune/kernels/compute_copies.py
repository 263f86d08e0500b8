"""Compute-dtype copies of the trained adapter matrices, refreshed in one pass a step.

A fused LoRA forward (kernels/lora*.py) needs A and B in the compute dtype (bf16) while
they train in fp32. Cast where they are used, that is a cast per matrix and a
concatenation per group of siblings: about 500 small kernels an 8B step, each a couple of
microseconds plus a launch gap. Instead each group of matrices gets one copy:

    copy(A_q, A_k, A_v) = [A_q; A_k; A_v] in bf16     (n·r, in): the siblings' concatenation
    copy(B_q)           = B_q in bf16                  (out, r)

A copy stays valid while its parameters are unchanged (same version counter, same
storage). Every optimizer step ends by refreshing every stale copy of every group with
one `torch._foreach_copy_` (a multi-tensor kernel; a global optimizer step hook), so
that the next forward finds them current. That host work happens while the GPU still runs
the step's queued backward: done at the first use instead, it came right after the next
forward's one wait (transformers' packed-rows check) and left the GPU idle for ~4 ms a
step (bench/NOTES.md run 29). A copy found stale anyway (weights edited outside an
optimizer) is refreshed at its use. A backward that reads a copy refreshed since its
forward fails with autograd's own in-place error instead of using other values.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

_live: weakref.WeakSet = weakref.WeakSet()  # every copy, so that one pass refreshes them all
_hooked = False  # the optimizer step hook is registered


class _Copy:
    """The rows of `sources`, stacked, in `dtype`; with the state they were copied at."""

    def __init__(self, sources: Sequence[Tensor], dtype: torch.dtype) -> None:
        rows = sum(t.shape[0] for t in sources)
        self.sources = tuple(weakref.ref(t) for t in sources)  # held by sources[0]: no cycle
        self.tensor = sources[0].new_empty((rows, *sources[0].shape[1:]), dtype=dtype)
        self.parts = self.tensor.split([t.shape[0] for t in sources])
        self.copied_at: tuple | None = None

    def alive(self) -> list[Tensor] | None:
        sources = [ref() for ref in self.sources]
        return None if any(t is None for t in sources) else sources

    def state(self) -> tuple:
        return tuple((t._version, t.data_ptr()) for t in self.alive() or ())

    def stale(self) -> bool:
        return self.alive() is not None and self.copied_at != self.state()


def compute_copy(sources: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """[sources[0]; sources[1]; …] (stacked along dim 0) in `dtype`, a copy that is current.

    The copy is made once and lives as long as sources[0]; when any copy is stale, every
    stale copy is refreshed at once. Without a gradient to track (`sources` are parameters
    whose gradients the fused functions compute themselves).
    """
    if len(sources) == 1 and sources[0].dtype == dtype:
        return sources[0].detach()
    copies = sources[0].__dict__.setdefault("_compute_copies", {})
    key = (dtype, tuple(id(t) for t in sources))
    copy = copies.get(key)
    if copy is None:
        copy = copies[key] = _Copy(sources, dtype)
        _live.add(copy)
        _hook_optimizers()
    if copy.stale():
        refresh()
    return copy.tensor


def refresh() -> None:
    """Copy every stale copy's sources into it, in one multi-tensor pass per device."""
    stale = [c for c in list(_live) if c.stale()]
    with torch.no_grad():
        by_device: dict[torch.device, tuple[list, list]] = {}
        for c in stale:
            parts, sources = by_device.setdefault(c.tensor.device, ([], []))
            parts += c.parts
            sources += [t.detach() for t in c.alive()]
        for parts, sources in by_device.values():
            torch._foreach_copy_(parts, sources)
    for c in stale:
        c.copied_at = c.state()


def _hook_optimizers() -> None:
    """Refresh the copies at the end of every optimizer step (registered once)."""
    global _hooked
    if not _hooked:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda *_: refresh())
        _hooked = True
