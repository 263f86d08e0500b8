"""The memory plan of a run: what trains in which dtype, which kernels run, what is recomputed.

Training Deep Nets with Sublinear Memory Cost, Chen et al. 2016, arXiv:1604.06174.
A decoder layer that is not recomputed keeps its activations from its forward to its
backward; a recomputed one keeps only its input (on the GPU, or offloaded to pinned CPU
memory). `--checkpointing` chooses:

    all       recompute every layer            none    recompute none
    offload   every layer, inputs on the CPU   F       a share F of the layers (0 < F < 1)
    auto      on a GPU: step 1 recomputes every layer, inputs offloaded, and measures it;
              then k = ⌊(budget − peak_all) / a⌋ layers stop being recomputed, where
              peak_all = the step's peak plus the inputs it offloaded, scaled to the
              longest batch (+ optimizer state): "all" without offload,
              a = what one layer keeps for backward at that batch (measured, not guessed);
              if even peak_all is over the budget, the inputs are offloaded. When some
              layers would be recomputed and every MLP takes the gated LoRA kernel, its
              activation h (tokens × intermediate, bf16) is rebuilt in backward instead of
              kept (kernels/lora_mlp.py), a − h per kept layer, if that recomputes fewer:
              one more elementwise pass a layer instead of a whole layer's forward.
              When no layer is recomputed and the budget still has room for every 4-bit
              weight in bf16, a dequantized copy of each is held for the run
              (kernels/lora.py `FrozenWeight`): no dequantization in a step instead of two,
              for memory that is free anyway (the peak is the one of keeping each forward's
              copy for its backward: every copy is alive when backward starts).
              On the CPU: none (as before).

    budget = --gpu-memory GiB, default 90% of the GPU memory free when the run starts.

On a GPU the frozen base is bf16 (or 4-bit), the trained parameters and their AdamW state
fp32, and the fused kernels run unless SLIMTUNE_KERNELS=0 (kernels/). The choice is made
once, printed as one line and recorded in summary.json under "memory".
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from slimtune.config import TrainConfig
from slimtune.kernels.recompute import enable_checkpointing, probe_activations

GiB = 2**30
OPTIM_STATE_BYTES = {"adamw": 8.0, "paged": 0.0, "8bit": 2.1}  # GPU bytes per trained value
BF16_BYTES = 2  # the activations' dtype on a GPU


def kernels_on(device: torch.device) -> bool:
    """The fused kernels run on CUDA with Triton unless SLIMTUNE_KERNELS=0."""
    from slimtune.quant.triton import triton

    return (
        device.type == "cuda"
        and triton is not None
        and os.environ.get("SLIMTUNE_KERNELS", "1") != "0"
    )


def decoder_layers(model: nn.Module) -> int:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(isinstance(m, GradientCheckpointingLayer) for m in model.modules())


def layers_to_keep(budget: float, peak_all: float, per_layer: float, layers: int) -> int:
    """How many layers can skip recomputation: ⌊(budget − peak_all) / per_layer⌋ in [0, layers]."""
    if per_layer <= 0:
        return layers
    return max(0, min(layers, int((budget - peak_all) // per_layer)))


def base_description(model: nn.Module) -> str:
    """'NF4 base 5.6 GiB' / 'bf16 base 15.0 GiB': what the frozen weights are and weigh."""
    from slimtune.quant.linear import quantization_of, quantized_layers

    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    stored = sum(
        b.numel() * b.element_size() for m in quantized_layers(model).values() for b in m.buffers()
    )
    record = quantization_of(model)
    dtypes = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    kind = record["quant"].upper() if record else "/".join(sorted(str(d)[6:] for d in dtypes))
    return f"{kind or 'no'} base {(frozen + stored) / GiB:.1f} GiB"


@dataclasses.dataclass
class MemoryPlan:
    """One run's choices; `after_step` completes an `auto` plan after the first step."""

    device: torch.device
    setting: str  # the --checkpointing value as given
    layers: int  # decoder layers of the model
    recomputed: int  # layers recomputed now
    offload: bool
    kernels: bool
    fused_modules: int  # RMSNorm / MLP modules on the Triton path
    base: str
    optim: str
    budget_gib: float | None = None
    per_layer_gib: float | None = None  # measured by `auto`
    peak_all_gib: float | None = None  # step 1's peak with every layer recomputed (scaled)
    rebuilt_mlp: bool = False  # the MLPs' activation is rebuilt in backward, not kept
    dequantized_gib: float = 0.0  # 4-bit weights held dequantized for the run
    pending: bool = False  # `auto` before its first step
    probe: list = dataclasses.field(default_factory=list, repr=False)
    worst_tokens: int = 0  # tokens of the longest micro-batch the data can make
    before_bytes: int = 0  # GPU memory allocated before the first step

    def line(self) -> str:
        where = self.device.type
        if self.device.type == "cuda":
            where = f"cuda ({torch.cuda.get_device_name(self.device)})"
        budget = f" (budget {self.budget_gib:.0f} GiB)" if self.budget_gib else ""
        offload = ", inputs offloaded to CPU" if self.offload else ""
        offload += ", MLP activations rebuilt in backward" if self.rebuilt_mlp else ""
        if self.dequantized_gib:
            offload += f", 4-bit weights held dequantized ({self.dequantized_gib:.1f} GiB)"
        kernels = "fused kernels on" if self.kernels else "fused kernels off"
        if self.kernels and not self.fused_modules:
            kernels += " (LoRA and loss only: this family's norms and MLP run in plain PyTorch)"
        return (
            f"{where}: {self.base}, recompute {self.recomputed}/{self.layers} layers"
            f"{budget}{offload}, {kernels}, optimizer {self.optim}"
        )

    def record(self) -> dict:
        keys = ("setting", "layers", "recomputed", "offload", "kernels", "fused_modules", "base",
                "optim", "budget_gib", "per_layer_gib", "peak_all_gib", "rebuilt_mlp",
                "dequantized_gib")  # fmt: skip
        return {"line": self.line(), **{k: getattr(self, k) for k in keys}}

    def after_step(self, model: nn.Module) -> bool:
        """Complete an `auto` plan from the first step's measurements; True when it did."""
        if not self.pending:
            return False
        self.pending = False
        probe_activations(None)
        peak = torch.cuda.max_memory_allocated(self.device)
        after = torch.cuda.memory_allocated(self.device)  # weights + optimizer state
        measured = Measurements(
            self.before_bytes, peak, after, self.probe, self.worst_tokens, offloaded=True
        )
        chosen = choose_recomputation(measured, self.budget_gib * GiB, self.layers)
        rebuilt = self.rebuilt_choice(model, measured, chosen)
        self.recomputed, self.offload, per_layer, peak_all = rebuilt or chosen
        self.rebuilt_mlp = rebuilt is not None
        self.per_layer_gib, self.peak_all_gib = per_layer / GiB, peak_all / GiB
        fraction = self.recomputed / self.layers if self.layers else 0.0
        enable_checkpointing(model, offload=self.offload, fraction=fraction)
        if not self.recomputed:
            room = self.budget_gib * GiB - peak_all - self.layers * per_layer
            self.dequantized_gib = hold_dequantized(model, room) / GiB
        return True

    def release(self, model: nn.Module) -> None:
        """Drop what the plan holds for the run (the dequantized copies) once it ends."""
        if self.dequantized_gib:
            hold_dequantized(model, 0.0)

    def rebuilt_choice(self, model: nn.Module, measured: Measurements, chosen: tuple):
        """The plan with every gated MLP's activation rebuilt in backward, where that
        recomputes fewer layers than `chosen`; else None (and nothing is changed)."""
        from slimtune.kernels.llama_ops import gated_mlps, rebuild_gated_outputs

        intermediate = getattr(getattr(model, "config", None), "intermediate_size", None)
        if not chosen[0] or not intermediate or len(gated_mlps(model)) < self.layers:
            return None
        budget = self.budget_gib * GiB
        saved = BF16_BYTES * intermediate  # h, per token of a kept layer
        other = choose_recomputation(measured, budget, self.layers, saved_per_token=saved)
        if other[0] >= chosen[0]:
            return None
        rebuild_gated_outputs(model, True)
        return other


def hold_dequantized(model: nn.Module, room: float) -> int:
    """Hold a bf16 dequantized copy of every 4-bit base weight on its layer if all of them
    fit in `room` bytes; the bytes held (0, with every copy dropped, when they do not fit)."""
    from slimtune.quant.linear import quantized_layers

    layers = [m for m in quantized_layers(model).values() if m.quant_type in ("nf4", "fp4")]
    needed = sum(BF16_BYTES * m.in_features * m.out_features for m in layers)
    fits = bool(layers) and needed <= room
    for m in layers:
        m.dequantized = m.dequantize_weight(torch.bfloat16) if fits else None
    return needed if fits else 0


@dataclasses.dataclass(frozen=True)
class Measurements:
    """What step 1 (every layer recomputed) showed, in bytes."""

    before: int  # allocated before the step (weights, adapters)
    peak: int  # the step's peak
    after: int  # allocated after it (weights, adapters, optimizer state)
    probe: list[tuple[int, ...]]  # (bytes one recomputed layer kept, its tokens, its input's bytes)
    worst_tokens: int  # tokens of the largest micro-batch the data can make
    offloaded: bool = False  # step 1 kept the layer inputs in CPU memory (not in `peak`)


def choose_recomputation(
    m: Measurements, budget: float, layers: int, saved_per_token: float = 0.0
) -> tuple[int, bool, float, float]:
    """(layers recomputed, offload, bytes a kept layer holds, peak with all recomputed), all
    scaled from step 1's batch to the largest batch the data can make; `saved_per_token`:
    bytes a kept layer no longer holds per token (its MLP activation rebuilt)."""
    tokens = max((t for _, t, *_ in m.probe), default=1)
    scale = max(1.0, m.worst_tokens / max(tokens, 1))
    inputs = sum(entry[2] for entry in m.probe) if m.offloaded else 0
    peak_all = (m.peak - m.before + inputs) * scale + m.after
    per_token = max((used / max(t, 1) for used, t, *_ in m.probe), default=0.0)
    per_token = max(0.0, per_token - saved_per_token)
    per_layer = per_token * max(m.worst_tokens, tokens)
    keep = layers_to_keep(budget, peak_all, per_layer, layers)
    return layers - keep, peak_all > budget, per_layer, peak_all


def _budget_gib(config: TrainConfig, device: torch.device) -> float:
    if config.gpu_memory is not None:
        return float(config.gpu_memory)
    free, _ = torch.cuda.mem_get_info(device)
    return 0.9 * (free + torch.cuda.memory_reserved(device)) / GiB


def plan_memory(model: nn.Module, config: TrainConfig, device: torch.device, data) -> MemoryPlan:
    """Put `model` in its training dtypes, patch the kernels and set up recomputation."""
    cuda = device.type == "cuda"
    if cuda:
        for p in model.parameters():  # the trained parameters (and so AdamW's state) in fp32
            if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
    kernels = kernels_on(device)
    fused = 0
    if kernels:
        from slimtune.kernels.llama_ops import patch_llama

        fused = patch_llama(model)
    layers = decoder_layers(model)
    setting = str(config.checkpointing)
    plan = MemoryPlan(device, setting, layers, 0, setting == "offload", kernels, fused,
                      base_description(model), config.optim)  # fmt: skip
    if setting == "auto" and cuda and layers:
        plan.budget_gib, plan.pending = _budget_gib(config, device), True
        longest = max((len(ex.input_ids) for ex in data.examples), default=1)
        plan.worst_tokens = config.batch_size * longest
        plan.before_bytes = torch.cuda.memory_allocated(device)
        probe_activations(plan.probe)
        fraction = 1.0  # and offloaded, so that even a budget below "all" holds in step 1
    elif setting in ("auto", "none"):
        fraction = 0.0  # the model's own default: nothing recomputed, nothing changed
    else:
        fraction = 1.0 if setting in ("all", "offload") else float(setting)
    if layers and fraction:
        offload = plan.offload or plan.pending
        plan.recomputed = enable_checkpointing(model, offload=offload, fraction=fraction)
    return plan
