"""AdamW with its state paged to CPU memory, or stored in 8 bits: less GPU memory per parameter.

AdamW: Loshchilov & Hutter 2019, arXiv:1711.05101. 8-bit states: Dettmers et al. 2022,
"8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861. Paged optimizers are
the third ingredient of QLoRA (Dettmers et al. 2023, arXiv:2305.14314).

    m ← β1 m + (1 - β1) g,   v ← β2 v + (1 - β2) g²
    θ ← θ - lr · ( m / (1 - β1ᵗ) / (sqrt(v / (1 - β2ᵗ)) + eps) + wd · θ )

Full AdamW keeps m and v in fp32: 8 bytes per trained parameter on the GPU.
- `PagedAdamW` keeps them in pinned CPU memory and brings them to the GPU a chunk of 4M
  values at a time (0 bytes resident; costs two PCIe copies of the state per step).
- `AdamW8bit` keeps them as 8-bit codes of the dynamic map in blocks of 256 with one fp32
  absmax per block (≈ 2.03 bytes per parameter): m with the signed map, v with the
  unsigned one; tensors under 4096 values keep fp32 state, as bitsandbytes does.
Both update a large tensor in chunks, so the fp32 temporaries of a step stay ~100 MB
however large the embedding is.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

from slimtune.quant.blockwise import dynamic_map

BLOCK = 256  # values per absmax of an 8-bit state
MIN_8BIT_SIZE = 4096  # smaller tensors keep fp32 state
CHUNK = 1 << 22  # values updated at once (a multiple of BLOCK): bounds fp32 temporaries


def adamw_step_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, group: dict) -> None:
    """One AdamW update of `p` (any float dtype) with fp32 moments `m`, `v` (in place)."""
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    g = g.float()
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v / (1 - beta2**step)).sqrt_().add_(eps)
    update = (m / (1 - beta1**step)).div_(denom)
    if wd:
        update.add_(p.float(), alpha=wd)
    p.copy_((p.float() - lr * update).to(p.dtype))


@cache
def unsigned_dynamic_map() -> Tensor:
    """bitsandbytes' `create_dynamic_map(signed=False)`: 256 sorted values in [0, 1]."""
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** (i + 1) + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted([*data, 0.0, 1.0]), dtype=torch.float32)


def quantize_8bit(x: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest code of each x / absmax (exact search), blocks of 256: (uint8 codes, fp32 absmax)."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    grid = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)  # (blocks, 256)
    absmax = grid.abs().amax(dim=1).clamp(min=1e-30)
    scaled = (grid / absmax.unsqueeze(1)).reshape(-1)
    midpoints = (code[1:] + code[:-1]) / 2
    codes = torch.bucketize(scaled, midpoints).to(torch.uint8)
    return codes, absmax


def dequantize_8bit(codes: Tensor, absmax: Tensor, code: Tensor, numel: int) -> Tensor:
    """code[q] · absmax per block, flat fp32 of `numel` values."""
    return (code[codes.long()].view(-1, BLOCK) * absmax.unsqueeze(1)).reshape(-1)[:numel]


@cache
def _maps(device: torch.device) -> tuple[Tensor, Tensor]:
    """The signed and unsigned dynamic maps, copied once per device."""
    return dynamic_map().to(device), unsigned_dynamic_map().to(device)


def _chunks(n: int) -> list[tuple[int, int]]:
    """[start, end) slices of CHUNK values: the fp32 temporaries of one update stay small."""
    return [(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]


class _ChunkedAdamW(torch.optim.Optimizer):
    """AdamW's hyperparameters and step loop; subclasses store the moments (`_update`)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        self._after_step()
        return loss

    def _update(self, p: Tensor, group: dict) -> None:
        raise NotImplementedError

    def _after_step(self) -> None:
        """Runs once after every parameter was updated."""


class PagedAdamW(_ChunkedAdamW):
    """AdamW whose fp32 moments live in pinned CPU memory and visit the GPU a chunk at a time."""

    def _after_step(self) -> None:
        if any(p.is_cuda for g in self.param_groups for p in g["params"]):
            torch.cuda.synchronize()  # the pinned buffers must hold the state before reuse

    def _update(self, p: Tensor, group: dict) -> None:
        state, n = self.state[p], p.numel()
        if not state:
            pin = p.is_cuda
            state["step"] = 0
            state["exp_avg"] = torch.zeros(n, dtype=torch.float32, pin_memory=pin)  # flat
            state["exp_avg_sq"] = torch.zeros(n, dtype=torch.float32, pin_memory=pin)
        state["step"] += 1
        flat_p, flat_g = p.view(-1), p.grad.reshape(-1)  # parameters are contiguous
        for s, e in _chunks(n):
            m = state["exp_avg"][s:e].to(p.device, non_blocking=True)  # page in
            v = state["exp_avg_sq"][s:e].to(p.device, non_blocking=True)
            adamw_step_(flat_p[s:e], flat_g[s:e], m, v, state["step"], group)
            if p.is_cuda:  # page out; later copies queue behind these on the stream
                state["exp_avg"][s:e].copy_(m, non_blocking=True)
                state["exp_avg_sq"][s:e].copy_(v, non_blocking=True)


class AdamW8bit(_ChunkedAdamW):
    """AdamW with m and v stored as blockwise 8-bit dynamic-map codes (fp32 math per chunk)."""

    def _update(self, p: Tensor, group: dict) -> None:
        state, n = self.state[p], p.numel()
        if not state:
            state["step"] = 0
            if n < MIN_8BIT_SIZE:
                state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            else:
                blocks = math.ceil(n / BLOCK)
                for name in ("m", "v"):
                    codes = torch.zeros(blocks * BLOCK, dtype=torch.uint8, device=p.device)
                    state[f"{name}_codes"] = codes
                    state[f"{name}_absmax"] = torch.zeros(blocks, device=p.device)
        state["step"] += 1
        if n < MIN_8BIT_SIZE:
            adamw_step_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group)
            return
        maps = dict(zip(("m", "v"), _maps(p.device), strict=True))  # signed m, unsigned v
        flat_p, flat_g = p.view(-1), p.grad.reshape(-1)
        for s, e in _chunks(n):  # CHUNK is a multiple of BLOCK: chunks own whole blocks
            b0, b1 = s // BLOCK, math.ceil(e / BLOCK)
            moments = {
                k: dequantize_8bit(state[f"{k}_codes"][b0 * BLOCK : b1 * BLOCK],
                                   state[f"{k}_absmax"][b0:b1], code, e - s)
                for k, code in maps.items()
            }  # fmt: skip
            adamw_step_(flat_p[s:e], flat_g[s:e], moments["m"], moments["v"], state["step"], group)
            for k, code in maps.items():
                codes, absmax = quantize_8bit(moments[k], code)
                state[f"{k}_codes"][b0 * BLOCK : b1 * BLOCK] = codes
                state[f"{k}_absmax"][b0:b1] = absmax


def state_bytes(optimizer: torch.optim.Optimizer, device: str = "cuda") -> int:
    """Bytes of optimizer state held on `device` (a device type: "cuda" or "cpu")."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor) and value.device.type == device:
                total += value.numel() * value.element_size()
    return total


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """`--optim NAME` -> the optimizer: adamw (torch's), paged (PagedAdamW) or 8bit (AdamW8bit)."""
    return {"adamw": torch.optim.AdamW, "paged": PagedAdamW, "8bit": AdamW8bit}[name]
