"""Streamed loading: a transformers model built on the meta device, its safetensors weights
moved into it one tensor at a time, on the training device, in the compute dtype.

    config.json ──► model skeleton (parameters on the meta device: no memory, no init)
    *.safetensors ──► one tensor at a time ──► device, compute dtype ──► into the skeleton
                                          └──► (a linear weight, with quantize) 4-bit on the device

At most one full-precision tensor exists at a time (the host's own memory stays at about the
largest tensor); a bitsandbytes 4-bit directory's codes go to the device unchanged.
`slimtune.models.load_model` uses it on a GPU, for QLoRA and for bitsandbytes directories.
`release_freed_memory` hands the heap that streamed tensors leave behind back to the OS
(the streamed merge and compare's memory figures call it).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from slimtune.errors import SlimtuneError


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: its allocator returns memory in its own way


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed blocks below its (adaptive)
    mmap threshold, so tensors made and dropped one after another (a streamed merge's float32
    copies, the fp32 weights QLoRA quantized away) would still count in resident memory
    (a 1B merge: 0.48 GiB peak with this, 1.19 GiB without)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def weight_files(directory: Path) -> dict[str, Path]:
    """Every tensor name of the directory's safetensors weights -> the file holding it."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {key: directory / name for key, name in weight_map.items()}
    single = directory / "model.safetensors"
    files = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
    found: dict[str, Path] = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            found |= dict.fromkeys(handle.keys(), path)
    return found


def is_bnb_4bit(directory: Path) -> bool:
    """Whether config.json says the weights were saved by bitsandbytes in 4 bits."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") or {}
    return quant.get("quant_method") == "bitsandbytes" and bool(quant.get("load_in_4bit"))


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (buffers stay real: RoPE's
    inv_freq is computed at construction and never saved)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _skeleton(directory: Path, dtype: torch.dtype, auto_class: str) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # read by the streamer below, not by transformers
    with _parameters_on_meta():
        model = getattr(transformers, auto_class).from_config(config, dtype=dtype)
    model.config._name_or_path = str(directory)
    if (directory / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    return model


def _bnb_owner(files: dict[str, Path]) -> dict[str, str]:
    """Each tensor name of a bitsandbytes 4-bit layer -> that layer's name."""
    from slimtune.quant.bnb_checkpoint import bnb_4bit_prefixes

    prefixes = bnb_4bit_prefixes(dict.fromkeys(files))
    owner = {}
    for key in files:
        module, _, _ = key.partition(".weight")
        if module in prefixes or key.removesuffix(".bias") in prefixes:
            owner[key] = module if module in prefixes else key.removesuffix(".bias")
    return owner


def _tied_targets(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if getattr(model.config, "tie_word_embeddings", True) else set()


def _key_mismatch(model: nn.Module, files: dict[str, Path], owner: dict[str, str]) -> list[str]:
    """Tensor names that do not line up between the checkpoint and the model (empty: streamable)."""
    stored = {key for key in files if key not in owner}
    stored |= {f"{name}.weight" for name in owner.values()}
    stored |= {key for key in files if key in owner and key.endswith(".bias")}
    expected = set(model.state_dict())
    missing = expected - stored - _tied_targets(model)
    return sorted(missing | (stored - expected))


def _keep_fp32(model: nn.Module, key: str) -> bool:
    names = getattr(model, "_keep_in_fp32_modules", None) or ()
    return any(name in key.split(".") for name in names)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = value


class _Streamer:
    """Moves one checkpoint tensor at a time into a meta-device skeleton."""

    def __init__(self, model, files, device, dtype, quant: dict | None) -> None:
        from slimtune.quant.linear import quantizable_linears

        self.model, self.files, self.device, self.dtype, self.quant = (
            model, files, device, dtype, quant
        )  # fmt: skip
        self.handles: dict[Path, object] = {}
        self.owner = _bnb_owner(files)
        self.targets = set(quantizable_linears(model, quant["skip"])) if quant else set()
        self.quantized: dict[str, nn.Module] = {}
        self.dtypes: set[torch.dtype] = set()

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files[key]
        if path not in self.handles:
            self.handles[path] = safe_open(path, framework="pt")
        return self.handles[path].get_tensor(key)

    def to_device(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        moved = tensor.to(self.device)  # the cast runs on the device
        if moved.is_floating_point():
            moved = moved.to(torch.float32 if _keep_fp32(self.model, key) else self.dtype)
        if moved.data_ptr() == tensor.data_ptr():  # still the file's mapped pages: a copy, so
            moved = moved.clone()  # that the mapping (every page read so far) can close
        return moved

    def run(self) -> None:
        done: set[str] = set()
        for key in self.files:
            if key in done:
                continue
            if key in self.owner:
                done |= self.load_bnb(self.owner[key])
            else:
                self.load(key, self.read(key))

    def load(self, key: str, tensor: torch.Tensor) -> None:
        from slimtune.quant import quantize
        from slimtune.quant.linear import QuantLinear

        module_name, _, attr = key.rpartition(".")
        value = self.to_device(key, tensor)
        del tensor
        if module_name not in self.targets:
            return _set_tensor(self.model, key, value)
        if attr == "bias" and module_name in self.quantized:
            self.quantized[module_name].bias = nn.Parameter(value, requires_grad=False)
            return None
        if attr == "bias":
            return _set_tensor(self.model, key, value)
        q = self.quant
        state = quantize(value, q["quant"], q["blocksize"], q["double_quant"], q["threshold"])
        self.dtypes.add(value.dtype)
        linear = self.model.get_submodule(module_name)
        bias = linear.bias if linear.bias is not None and not linear.bias.is_meta else None
        self.replace(module_name, QuantLinear(state, bias))
        return None

    def load_bnb(self, prefix: str) -> set[str]:
        from slimtune.quant.bnb_checkpoint import quant_state_from_bnb
        from slimtune.quant.linear import QuantLinear

        keys = {key for key, name in self.owner.items() if name == prefix}
        entries = {key: self.read(key) for key in keys}
        state = quant_state_from_bnb(prefix, entries)
        bias = entries.get(f"{prefix}.bias")
        bias = None if bias is None else self.to_device(f"{prefix}.bias", bias)
        self.replace(prefix, QuantLinear(state, bias).to(self.device))
        return keys

    def replace(self, name: str, layer: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, layer)
        self.quantized[name] = layer


def streamed_model(
    directory: Path,
    dtype: torch.dtype,
    device: torch.device,
    quant: dict | None = None,
    auto_class: str = "AutoModelForCausalLM",
) -> nn.Module | None:
    """Build the model on the meta device and stream its weights into it on `device`.

    Args:
        directory: a transformers directory (one safetensors file or a sharded index).
        dtype: the compute dtype floating-point tensors are cast to (on the device).
        device: where every tensor goes as it is read.
        quant: None, or quant.linear.QUANT_DEFAULTS plus "quant": each linear weight (but
            `skip`) is quantized as it arrives.

    Returns:
        The model, or None when the checkpoint's names do not line up with the model's
        (a family whose weights transformers renames while loading): load it plainly then.
    """
    from slimtune.quant.linear import ATTRIBUTE, record_quantization

    files = weight_files(directory)
    model = _skeleton(directory, dtype, auto_class)
    streamer = _Streamer(model, files, device, dtype, quant)
    mismatch = _key_mismatch(model, files, streamer.owner)
    if mismatch and streamer.owner:
        raise SlimtuneError(
            f"{directory}: 4-bit checkpoint does not fit its config: {mismatch[:3]}"
        )
    if mismatch:
        return None
    streamer.run()
    for module in model.modules():  # non-persistent buffers (built on the CPU)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    model.tie_weights()
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise SlimtuneError(f"{directory}: the weights hold no tensor {left[0]!r}")
    if streamer.owner:
        first = next(iter(streamer.quantized.values())).quant_state
        setattr(model, ATTRIBUTE, {
            "quant": first.quant_type, "blocksize": first.blocksize,
            "double_quant": first.double_quant, "skip": [], "modules": len(streamer.quantized),
        })  # fmt: skip
    elif quant:
        record_quantization(model, quant, streamer.dtypes, len(streamer.quantized))
    return model
