"""A frozen quantized linear layer, and quantizing a whole model in place (QLoRA's base).

QLoRA, Dettmers et al. 2023, arXiv:2305.14314: the base weights are stored in 4-bit
NF4 (or FP4, or int8) and dequantized on the fly for each matmul; LoRA trains on top.

    x ──► dequantize(codes, statistics) → Ŵ (x.dtype) ──► y = x Ŵᵀ + b
          (frozen buffers; Ŵ is rebuilt in backward instead of kept)

Gradients flow to x (and so into LoRA's A and B wrapped around this layer), never to
the codes. The statistics keep their dtype through `model.to(torch.bfloat16)`.

For FSDP2 (distributed.py) `store_as_parameters()` turns the stored tensors into frozen
parameters, each a flat bf16 *view of its bytes* (as bitsandbytes' `quant_storage=bf16`):
FSDP2 shards parameters only, and some torch versions (2.11) make every sharded tensor
a Parameter, which only floating dtypes can be. Reading them views the bytes back:

    codes uint8 (n,) ──bytes──► bf16 (⌈n/2⌉,) (a zero byte appended to an odd n) ──► uint8 (n,)

    model = st.quantize_model(model, "nf4")     # every nn.Linear except lm_head
    st.quant.linear.quantization_of(model)      # {"quant": "nf4", "blocksize": 64, ...}
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from slimtune.errors import SlimtuneError
from slimtune.quant import QuantState, QuantState4bit, QuantStateInt8, check_quant_args, quantize

STORAGE_DTYPE = torch.bfloat16  # what stored tensors become for sharding: bytes, never cast
ATTRIBUTE = "slimtune_quantization"  # where quantize_model records what it did on the model
# quantize_model's settings when nothing else is said (a record may leave any of them out)
QUANT_DEFAULTS = {"blocksize": 64, "double_quant": True, "threshold": 6.0, "skip": ["lm_head"]}
ADAPTER_PARTS = re.compile(r"(^|\.)(lora_[A-Za-z_]+|adapter_[A-Za-z_]+|modules_to_save)(\.|$)")


def _dequantize(state: QuantState, dtype: torch.dtype) -> Tensor:
    """Dequantize with the GPU kernel where it applies (quant/triton.py), else the reference."""
    if isinstance(state, QuantState4bit) and state.codes.is_cuda:
        try:
            from slimtune.quant.triton import dequantize
        except ImportError:
            return state.dequantize(dtype)
        return dequantize(state, dtype)
    return state.dequantize(dtype)


def bytes_as_storage(tensor: Tensor) -> Tensor:
    """The bytes of `tensor` as a flat STORAGE_DTYPE tensor (a reinterpretation, no cast)."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
    pad = -raw.numel() % STORAGE_DTYPE.itemsize  # an odd byte count gets one zero byte
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    return raw.view(STORAGE_DTYPE)  # (⌈nbytes / 2⌉,)


def storage_as(storage: Tensor, dtype: torch.dtype, shape: torch.Size) -> Tensor:
    """Undo `bytes_as_storage`: the first nbytes of `storage` viewed as `dtype`, `shape`."""
    nbytes = shape.numel() * dtype.itemsize
    return storage.view(torch.uint8)[:nbytes].view(dtype).view(shape)


class _FrozenMatmul(torch.autograd.Function):
    """y = x Ŵᵀ with Ŵ dequantized in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight_fn: Callable[[], Tensor]) -> Tensor:
        ctx.weight_fn = weight_fn
        return nn.functional.linear(x, weight_fn())  # (..., out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return torch.matmul(grad, ctx.weight_fn()), None  # (..., in)


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized (nf4, fp4 or int8)."""

    def __init__(self, state: QuantState, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = state.shape
        self.quant_type = state.quant_type
        self.compute_dtype = state.dtype  # dtype of the original weight (merges go back to it)
        self._meta = {"shape": state.shape, "dtype": state.dtype}
        if isinstance(state, QuantState4bit):
            self._meta |= {"blocksize": state.blocksize}
            names = ("codes", "absmax", "absmax2", "offset")
        else:
            self._meta |= {"threshold": state.threshold}
            names = ("codes", "absmax", "outlier_columns", "outliers")
        for name in names:
            self.register_buffer(name, getattr(state, name))
        self._as_bytes: dict[str, tuple[torch.dtype, torch.Size]] = {}  # see store_as_parameters
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        # a dequantized copy the memory plan holds for a run (training/memory.py
        # `hold_dequantized`); not state: never saved, moved or cast with the module
        self.dequantized: Tensor | None = None

    def _stored(self, name: str) -> Tensor | None:
        """A stored tensor in its own dtype and shape (viewed back from its bytes if need be)."""
        tensor = getattr(self, name)
        view = self._as_bytes.get(name)
        return tensor if view is None or tensor is None else storage_as(tensor, *view)

    @property
    def quant_state(self) -> QuantState:
        """The record of the stored weight (views of this layer's buffers)."""
        m, t = self._meta, self._stored
        if self.quant_type == "int8":
            return QuantStateInt8(
                t("codes"), t("absmax"), t("outlier_columns"), t("outliers"),
                m["shape"], m["dtype"], m["threshold"],
            )  # fmt: skip
        return QuantState4bit(
            self.quant_type, t("codes"), t("absmax"), m["shape"], m["dtype"],
            m["blocksize"], t("absmax2"), t("offset"),
        )  # fmt: skip

    def store_as_parameters(self) -> list[str]:
        """Make each stored tensor (codes and statistics) a frozen parameter holding its
        bytes as flat STORAGE_DTYPE, which FSDP2 shards on dim 0 like any parameter;
        scalars and empty tensors stay buffers. Returns the names that moved."""
        moved = []
        for name, tensor in list(self._buffers.items()):
            if tensor is None or tensor.dim() == 0 or tensor.numel() == 0:
                continue
            self._as_bytes[name] = (tensor.dtype, tensor.shape)
            del self._buffers[name]
            storage = nn.Parameter(bytes_as_storage(tensor), requires_grad=False)
            self.register_parameter(name, storage)
            moved.append(name)
        return moved

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dequantized weight Ŵ (out, in), in `dtype` (default: the original dtype)."""
        return _dequantize(self.quant_state, dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        held = self.dequantized
        if held is not None and held.dtype == x.dtype and held.device == x.device:
            y = nn.functional.linear(x, held)  # the held copy: nothing to dequantize
        else:
            y = _FrozenMatmul.apply(x, lambda: self.dequantize_weight(x.dtype))  # (..., out)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse: bool = True):
        """Move the stored tensors with the module but never change their dtype
        (`model.to(torch.float16)` must not cast codes, statistics or their bytes)."""
        before = {k: v for k, v in self._buffers.items() if v is not None}
        stored = {k: self._parameters[k].data for k in self._as_bytes if k in self._parameters}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        for name, old in stored.items():
            param = self._parameters[name]
            if param.dtype != old.dtype:
                param.data = old.to(param.device)
        return self

    def extra_repr(self) -> str:
        detail = f"blocksize={self._meta['blocksize']}" if "blocksize" in self._meta else "int8"
        double = ", double_quant" if getattr(self, "absmax2", None) is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"quant={self.quant_type}, {detail}{double}, bias={self.bias is not None}"
        )


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """A module is skipped when its name or a dotted suffix of it is listed (or matches)."""
    if ADAPTER_PARTS.search(name):
        return True  # adapters wrapped around a base (lora_A, lora_B, ...) are never quantized
    for pattern in skip:
        if name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name):
            return True
    return False


def quantizable_linears(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> list[str]:
    """Names of the nn.Linear modules of `model` that `quantize_model` replaces."""
    skip = list(skip)
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not _skipped(name, skip)
    ]


def record_quantization(
    model: nn.Module, settings: dict, dtypes: set[torch.dtype], modules: int
) -> None:
    """Note on `model` what was quantized (read back by `quantization_of`).

    `settings` holds quant, blocksize, double_quant, threshold and skip; `dtypes` the dtypes
    of the weights that were quantized (one dtype is recorded, float32 when mixed).
    """
    quant, skip = settings["quant"], list(settings["skip"])
    if quant == "int8":
        record = {"quant": quant, "threshold": settings["threshold"], "skip": skip}
    else:
        keys = ("blocksize", "double_quant")
        record = {"quant": quant, **{k: settings[k] for k in keys}, "skip": skip}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    record["dtype"] = str(dtype).removeprefix("torch.")
    setattr(model, ATTRIBUTE, record | {"modules": modules})


def quantize_model(
    model: nn.Module,
    quant: str = "nf4",
    skip: Iterable[str] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = True,
    threshold: float = 6.0,
) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a frozen QuantLinear.

    Args:
        model: any torch model (e.g. a transformers causal LM), fp32/bf16/fp16 weights.
        quant: "nf4", "fp4" or "int8".
        skip: module names (or dotted suffixes, or regexes) left in full precision.
        blocksize: values per absmax for nf4/fp4 (32 … 4096, powers of two).
        double_quant: nf4/fp4: 8-bit absmax in blocks of 256 (≈ 4.127 bits per parameter).
        threshold: int8: input columns with a |w| >= threshold stay 16-bit (0 = none).

    Returns:
        The same model; `quantization_of(model)` then describes what was applied.
    """
    check_quant_args(quant, blocksize)
    skip = list(skip)
    names = quantizable_linears(model, skip)
    dtypes = set()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        dtypes.add(linear.weight.dtype)
        state = quantize(linear.weight.data, quant, blocksize, double_quant, threshold)
        setattr(parent, child, QuantLinear(state, linear.bias))
    settings = dict(
        quant=quant, blocksize=blocksize, double_quant=double_quant, threshold=threshold, skip=skip
    )
    record_quantization(model, settings, dtypes, len(names))
    return model


def quantization_of(model: nn.Module) -> dict | None:
    """What `quantize_model` applied to `model` (None for a model it never touched)."""
    record = getattr(model, ATTRIBUTE, None)
    return dict(record) if record is not None else None


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every QuantLinear of `model` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# ----------------------------------------------------------------------------- merging QLoRA

METADATA_KEY = "slimtune.quantization"  # safetensors header key of an adapter trained on it


def quant_metadata(model: nn.Module) -> dict[str, str]:
    """Header metadata recording the quantization `model`'s base was trained on ({} if none).

    Pass it to `st.save_adapter(model, path, metadata=quant_metadata(model))`: PEFT ignores
    it, and `slimtune merge` uses it to merge into exactly the weights the adapter saw.
    """
    record = quantization_of(model)
    if record is None:
        return {}
    record.pop("modules", None)
    return {METADATA_KEY: json.dumps(record, sort_keys=True)}


def _record_from_metadata(metadata: dict[str, str]) -> dict | None:
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    try:
        record = json.loads(text)
        check_quant_args(record["quant"], record.get("blocksize", 64))
        getattr(torch, record.get("dtype", "float32"))
    except (ValueError, KeyError, TypeError, AttributeError, SlimtuneError) as exc:
        raise SlimtuneError(
            f"adapter metadata {METADATA_KEY}={text!r} is not readable ({exc})"
        ) from exc
    return record


def quantization_record(metadata: dict[str, str]) -> dict | None:
    """The quantization an adapter was trained on, from its header metadata (None: none)."""
    return _record_from_metadata(metadata)


def quantization_settings(record: dict) -> dict:
    """blocksize, double_quant, threshold and skip of a quantization record, the defaults
    filled in: the keywords quantize_model takes to quantize as the record says."""
    return {**QUANT_DEFAULTS, **{k: record[k] for k in QUANT_DEFAULTS if k in record}}


def requantized_weight(weight: Tensor, record: dict) -> Tensor:
    """dequantize(quantize(W0)) in float32 for one linear weight, as `trained_base` computes
    it for every layer (same settings, same weight dtype); `record` is quantization_record's."""
    s = quantization_settings(record)
    state = quantize(
        weight.to(getattr(torch, record.get("dtype", "float32"))),
        record["quant"], s["blocksize"], s["double_quant"], s["threshold"],
    )  # fmt: skip
    return _dequantize(state, torch.float32)


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every QuantLinear (in place) by an nn.Linear holding its dequantized weight."""
    for name, layer in list(quantized_layers(model).items()):
        parent_name, _, child = name.rpartition(".")
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight.data = layer.dequantize_weight(dtype)
        if layer.bias is not None:
            linear.bias.data = layer.bias.detach().to(dtype)
        setattr(model.get_submodule(parent_name), child, linear.requires_grad_(False))
    model.__dict__.pop(ATTRIBUTE, None)
    return model


def trained_base(model: nn.Module, metadata: dict[str, str]) -> nn.Module:
    """The full-precision base an adapter was trained against, ready to merge into.

    With no quantization in `metadata` the model is returned as it is. Otherwise every
    linear layer is quantized exactly as in training (same settings, same weight dtype;
    quantization is deterministic) and dequantized to fp32: W0 ← dequantize(quantize(W0)).
    Merging the adapter into that gives the trained QLoRA model's outputs.
    """
    record = _record_from_metadata(metadata)
    if record is None:
        return model
    settings = quantization_settings(record)
    dtype = getattr(torch, record.get("dtype", "float32"))
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not _skipped(name, settings["skip"]):
            module.weight.data = module.weight.data.to(dtype)
    quantize_model(model, record["quant"], **settings)
    return dequantize_model(model, torch.float32)


base_for_merge = trained_base
