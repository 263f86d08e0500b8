"""Low-rank adaptation (LoRA), Hu et al. 2021, arXiv:2106.09685.

    x ──► base_layer (frozen W0) ──────────────────────────┐
    │                                                      ▼
    └─► dropout ─► A (r×in) ─► B (out×r) ─► × scaling ─► (+) ─► h

    h = W0 x + scaling · B A x,   scaling = alpha / r   (alpha / √r with rsLoRA,
                                                         Kalajdzievski 2023, arXiv:2312.03732)

A starts Kaiming-uniform and B at zero, so training starts at the base model; only A and
B train. Merging folds the update into the weight, W = W0 + scaling · B A (in float32,
cast back), so merged inference costs nothing extra; unmerging subtracts it again.

Three thin layers wrap the original module as `base_layer` (PEFT's key paths follow):
  * LoraLinear       nn.Linear, transformers' Conv1D (weight stored (in, out), fan_in_fan_out)
                     or any frozen linear with in_features/out_features (quantized bases);
  * LoraEmbedding    nn.Embedding, with PEFT's lora_embedding_A (r×vocab) / lora_embedding_B;
  * LoraFusedLinear  loralib's MergedLinear: one fused in → k·d projection (GPT-2 c_attn,
                     Phi-3 qkv_proj) where enable_lora=[True, False, True] adapts only the
                     Q and V slices; the K slice of the output is left exactly unchanged:

        x ─► A (n·r × in) ─► split n ─► B_j (d × r) per enabled slice ─► [ΔQ, 0, ΔV]

Adapters are kept per name in ModuleDicts (`q_proj.lora_A.default.weight`), with one
active adapter, a disabled flag and the list of merged adapters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.errors import SlimtuneError
from slimtune.kernels.lora import try_lora_forward

# ----------------------------------------------------------------------------- math


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / √r for rank-stabilized LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """scaling · B A in float32: (out, r) @ (r, in) -> (out, in)."""
    return (b.float() @ a.float()) * scaling


def merge_weight(w0: Tensor, delta: Tensor, fan_in_fan_out: bool = False) -> Tensor:
    """W0 + delta, computed in float32 and returned in W0's dtype (delta is (out, in))."""
    delta = delta.T if fan_in_fan_out else delta  # Conv1D stores (in, out)
    return (w0.float() + delta).to(w0.dtype)


def unmerge_weight(w: Tensor, delta: Tensor, fan_in_fan_out: bool = False) -> Tensor:
    """W − delta, the inverse of merge_weight (exact up to float32 rounding)."""
    delta = delta.T if fan_in_fan_out else delta
    return (w.float() - delta).to(w.dtype)


def block_diagonal_b(b: Tensor, mask: list[bool], sizes: list[int], r: int) -> Tensor:
    """The fused layer's B as one (out, n·r) matrix: B_j on enabled slice j, zero rows elsewhere.

    b: (sum of enabled slice sizes, r), the enabled slices' B_j stacked. This is the B that
    PEFT stores for the fused layer (with A = the n stacked A_j, rank n·r).
    """
    n = sum(mask)
    full = b.new_zeros(sum(sizes), n * r)  # (out, n·r)
    row = brow = j = 0
    for enabled, size in zip(mask, sizes, strict=True):
        if enabled:
            full[row : row + size, j * r : (j + 1) * r] = b[brow : brow + size]
            brow, j = brow + size, j + 1
        row += size
    return full


def pissa_init(w0: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA (Meng et al. 2024, arXiv:2404.02948): A, B from the top-r singular vectors of W0.

    W0 = U S Vᵀ;  B = U_r √(S_r/s),  A = √(S_r/s) V_rᵀ;  W_res = W0 − s·B A, so that
    W_res + s·B A = W0 and the model is unchanged at step 0 (as PEFT's "pissa").
    Returns (A (r, in), B (out, r), W_res (out, in)), all float32.
    """
    u, s, vh = torch.linalg.svd(w0.float(), full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)  # (r,)
    a = root[:, None] * vh[:r]  # (r, in)
    b = u[:, :r] * root[None, :]  # (out, r)
    return a, b, w0.float() - scaling * (b @ a)


INIT_FROM_WEIGHT = ("pissa", "loftq")  # inits that factor W0 into A, B (and replace W0)


def init_lora_(a: Tensor, b: Tensor, init: bool | str, r: int) -> None:
    """Initialise A (r, in) and B (out, r) in place as PEFT does for Linear layers."""
    if init is False:  # nn.Linear's default for both: a random, non-zero adapter
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        return
    if init == "gaussian":
        nn.init.normal_(a, std=1 / r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(b)


def layer_device(layer: nn.Module) -> torch.device:
    """Where a layer's weights (parameters or buffers, e.g. quantized codes) live."""
    for tensor in (*layer.parameters(), *layer.buffers()):
        return tensor.device
    return torch.device("cpu")


def base_weight(layer: nn.Module) -> Tensor:
    """The frozen weight of a base layer, dequantized for a quantized one."""
    weight = getattr(layer, "weight", None)
    if isinstance(weight, Tensor):
        return weight
    if hasattr(layer, "dequantize_weight"):
        return layer.dequantize_weight(torch.float32)
    raise SlimtuneError(f"{type(layer).__name__} has no weight that LoRA can use")


# ----------------------------------------------------------------------------- layers


def _add_lora(result: Tensor, x: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """result + scaling · (x Aᵀ) Bᵀ, fused into one addmm when the dtypes agree."""
    xa = F.linear(x.to(a.dtype), a)  # (..., r)
    if result.dtype != b.dtype:
        return result + (F.linear(xa, b) * scaling).to(result.dtype)
    out = torch.addmm(
        result.reshape(-1, b.shape[0]), xa.reshape(-1, b.shape[1]), b.t(), alpha=scaling
    )
    return out.view(result.shape)  # (..., out)


class LoraLayer(nn.Module):
    """State shared by the LoRA layers: ranks, scalings, active/merged adapters."""

    adapter_params: tuple[str, ...] = ("lora_A", "lora_B")
    no_dense_weight: str | None = None  # names a layer kind PiSSA/LoftQ cannot factor

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)  # W0 stays frozen
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()  # only adapters with p > 0 have an entry
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.pissa_init: dict[
            str, tuple[Tensor, Tensor]
        ] = {}  # PiSSA's A0, B0 (to save as plain LoRA)

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: bool | str = True,
    ) -> None:
        """Create adapter `name`: its A and B in float32 on the base weight's device."""
        if init in INIT_FROM_WEIGHT and self.no_dense_weight is not None:
            raise SlimtuneError(
                f"init_lora_weights={init!r} is not available for {self.no_dense_weight}"
            )
        self._register(name, r, alpha, dropout, use_rslora)
        self._new_adapter(name, r, init)

    def _new_adapter(self, name: str, r: int, init: bool | str) -> None:
        """Make and initialise the A and B of the adapter `name` that _register just recorded."""
        raise NotImplementedError

    def _register(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        if name in self.r:
            raise SlimtuneError(f"this layer already has an adapter named {name!r}")
        self.r[name], self.lora_alpha[name], self.use_rslora[name] = r, alpha, use_rslora
        self.scaling[name] = lora_scaling(alpha, r, use_rslora)
        if dropout > 0:
            self.lora_dropout[name] = nn.Dropout(dropout)

    def _adapter_modules(self, name: str) -> list[nn.Module | nn.Parameter]:
        found = []
        for attr in self.adapter_params:
            container = getattr(self, attr)
            if name in container:
                found.append(container[name])
        return found

    def set_adapter(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.r]
        for name in self.r:
            for item in self._adapter_modules(name):
                item.requires_grad_(name in self.active_adapters)

    def delete_adapter(self, name: str) -> None:
        if name not in self.r:
            return
        if name in self.merged_adapters:
            raise SlimtuneError(f"adapter {name!r} is merged; unmerge before deleting it")
        for attr in (*self.adapter_params, "lora_dropout"):
            container = getattr(self, attr)
            if name in container:
                del container[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.use_rslora):
            del table[name]
        self.pissa_init.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled and self.merged_adapters:
            raise SlimtuneError("cannot disable a merged adapter; unmerge first")
        self.disabled = not enabled

    def delta_weight(self, name: str) -> Tensor:
        """scaling · B A for one adapter, float32, in the (out, in) layout."""
        raise NotImplementedError

    def merge(self, names: list[str]) -> None:
        for name in [n for n in names if n in self.r]:
            if name in self.merged_adapters:
                raise SlimtuneError(
                    f"adapter {name!r} is already merged; merging twice would add it twice"
                )
            self._materialize_base()
            weight = self.base_layer.weight
            weight.data = merge_weight(weight.data, self.delta_weight(name), self.fan_in_fan_out)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.base_layer.weight
            weight.data = unmerge_weight(weight.data, self.delta_weight(name), self.fan_in_fan_out)

    def unload(self) -> nn.Module:
        return self.base_layer

    fan_in_fan_out = False

    def _materialize_base(self) -> None:
        """A quantized base becomes an nn.Linear holding its dequantized weight (to merge into)."""
        if isinstance(getattr(self.base_layer, "weight", None), nn.Parameter):
            return
        base = self.base_layer
        weight = base_weight(base)  # (out, in) float32
        bias = getattr(base, "bias", None)
        linear = nn.Linear(
            self.in_features, self.out_features, bias=bias is not None, device=weight.device
        )
        linear.weight.data = weight.to(getattr(base, "compute_dtype", weight.dtype))
        if bias is not None:
            linear.bias.data = bias.detach().to(linear.weight.dtype)
        linear.requires_grad_(False)
        self.base_layer = linear


def _features(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear-like base layer."""
    if type(base).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight (in, out)
        return base.weight.shape[0], base.weight.shape[1], True
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return base.in_features, base.out_features, False
    raise SlimtuneError(f"LoRA cannot wrap {type(base).__name__}: it needs a Linear-like layer")


class LoraLinear(LoraLayer):
    """h = base_layer(x) + Σ_active scaling · B A dropout(x)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = _features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _adapter_rows(self, r: int) -> tuple[int, int]:
        """The rows of A and of B: A (r, in), B (out, r)."""
        return r, self.out_features

    def _new_adapter(self, name: str, r: int, init: bool | str) -> None:
        a_rows, b_rows = self._adapter_rows(r)
        device = layer_device(self.base_layer)
        self.lora_A[name] = nn.Linear(self.in_features, a_rows, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r, b_rows, bias=False, device=device)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if init in INIT_FROM_WEIGHT:
                self._init_from_weight(name, init)
            else:
                init_lora_(a, b, init, r)

    def _init_from_weight(self, name: str, init: str) -> None:
        """PiSSA / LoftQ: A and B from W0, and W0 replaced so the model starts unchanged."""
        self._materialize_base()
        weight = self.base_layer.weight
        w0 = weight.data.T if self.fan_in_fan_out else weight.data  # (out, in)
        if init == "pissa":
            a, b, residual = pissa_init(w0, self.r[name], self.scaling[name])
            self.pissa_init[name] = (a.clone(), b.clone())
        else:
            a, b, residual = _loftq(w0, self.r[name], self.scaling[name])
        self.lora_A[name].weight.data = a.to(self.lora_A[name].weight.dtype)
        self.lora_B[name].weight.data = b.to(self.lora_B[name].weight.dtype)
        residual = residual.T if self.fan_in_fan_out else residual
        weight.data = residual.to(weight.dtype).contiguous()

    def full_b(self, name: str) -> Tensor:
        """B (out, r) as the whole output sees it (the fused layer's is block-diagonal)."""
        return self.lora_B[name].weight

    def delta_weight(self, name: str) -> Tensor:
        return lora_delta(self.lora_A[name].weight, self.full_b(name), self.scaling[name])

    def fuses(self) -> bool:
        """Whether the fused CUDA path (kernels/) computes this layer: plain LoRA only (DoRA
        and the fused-QKV layer compute more than x W0ᵀ + s (x Aᵀ) Bᵀ)."""
        return type(self) is LoraLinear

    def fused_forward(self, x: Tensor, unread: bool = False) -> Tensor | None:
        """The fused CUDA path (kernels/lora.py) where it applies, else None."""
        return try_lora_forward(self, x, unread) if self.fuses() else None

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not args and not kwargs:
            fused = self.fused_forward(x)
            if fused is not None:
                return fused
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        if self.disabled or self.merged_adapters:
            return result
        for name in self.active_adapters:
            h = self.lora_dropout[name](x) if name in self.lora_dropout else x
            result = _add_lora(
                result, h, self.lora_A[name].weight, self.full_b(name), self.scaling[name]
            )
        return result


def _loftq(w0: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    from slimtune.quant.loftq import loftq_init

    residual, a, b = loftq_init(w0, r, scaling=scaling)  # (dequantized Q(W), A, B), as PEFT
    return a, b, residual


class LoraFusedLinear(LoraLinear):
    """loralib's MergedLinear: LoRA on chosen slices of a fused in → Σ sizes projection.

    Adapter `name` holds A (n·r, in) (the n enabled slices' A_j stacked) and B (Σ enabled
    sizes, r) (their B_j stacked); slice j's update is scaling · B_j A_j x.
    """

    no_dense_weight = "a fused layer with enable_lora"

    def __init__(
        self, base_layer: nn.Module, enable_lora: list[bool], sizes: list[int] | None = None
    ) -> None:
        super().__init__(base_layer)
        k = len(enable_lora)
        if sizes is None:
            if self.out_features % k:
                raise SlimtuneError(
                    f"enable_lora={enable_lora}: {self.out_features} outputs do not split into {k} equal slices"
                )
            sizes = [self.out_features // k] * k
        self.enable_lora, self.sizes = list(enable_lora), list(sizes)

    def _adapter_rows(self, r: int) -> tuple[int, int]:
        """A (n·r, in) for the n enabled slices, B (Σ enabled sizes, r)."""
        enabled_out = sum(s for s, e in zip(self.sizes, self.enable_lora, strict=True) if e)
        return sum(self.enable_lora) * r, enabled_out

    def full_b(self, name: str) -> Tensor:
        """(out, n·r) block-diagonal B with zero rows for the disabled slices."""
        return block_diagonal_b(
            self.lora_B[name].weight, self.enable_lora, self.sizes, self.r[name]
        )


class LoraEmbedding(LoraLayer):
    """h = E0[x] + scaling · (Aᵀ[x]) Bᵀ, with A (r, vocab) and B (dim, r) as PEFT stores them."""

    adapter_params = ("lora_embedding_A", "lora_embedding_B")
    no_dense_weight = "an Embedding layer"

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _new_adapter(self, name: str, r: int, init: bool | str) -> None:
        device = self.base_layer.weight.device
        a = torch.randn(r, self.in_features, device=device)  # (r, vocab)
        b = torch.randn(self.out_features, r, device=device)  # (dim, r)
        if init is not False:  # PEFT: A zero, B normal, so the update starts at zero
            nn.init.zeros_(a)
            nn.init.normal_(b)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)

    def delta_weight(self, name: str) -> Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        return lora_delta(a, b, self.scaling[name]).T  # (vocab, dim): the layout of E0

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)  # (..., dim)
        if self.disabled or self.merged_adapters:
            return result
        base = self.base_layer
        for name in self.active_adapters:
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            after_a = F.embedding(
                x,
                a.T,
                base.padding_idx,
                base.max_norm,
                base.norm_type,
                base.scale_grad_by_freq,
                base.sparse,
            )  # (..., r)
            result = result + ((after_a @ b.T) * self.scaling[name]).to(result.dtype)
        return result
