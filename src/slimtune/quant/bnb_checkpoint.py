"""Read and write bitsandbytes' 4-bit checkpoint format without bitsandbytes.

A transformers model saved with `BitsAndBytesConfig(load_in_4bit=True)` stores each
quantized Linear `P` as these state-dict entries (the layout of nf4.py exactly):

    P.weight                                uint8 (ceil(n/2), 1)  packed codes
    P.weight.absmax                         fp32 (nblocks,), or uint8 with double quant
    P.weight.quant_map                      fp32 (16,)    the 4-bit levels
    P.weight.nested_absmax                  fp32 (ceil(nblocks/256),)      double quant only
    P.weight.nested_quant_map               fp32 (256,)   the dynamic map  double quant only
    P.weight.quant_state.bitsandbytes__nf4  uint8: UTF-8 JSON {quant_type, blocksize, dtype,
                                            shape, nested_blocksize, nested_dtype, nested_offset}
    P.bias                                  (optional)

Since the layouts are identical, loading is a re-labelling: no value is recomputed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from slimtune.errors import SlimtuneError
from slimtune.quant import BLOCKSIZES
from slimtune.quant.blockwise import dynamic_map
from slimtune.quant.linear import ATTRIBUTE, QuantLinear
from slimtune.quant.nf4 import NESTED_BLOCKSIZE, QuantState4bit, codebook

PACKED_KEY = ".weight.quant_state.bitsandbytes__"


def _unpack_json(t: Tensor) -> dict:
    return json.loads(bytes(t.reshape(-1).tolist()).decode("utf-8"))


DTYPES = ("float32", "float16", "bfloat16")


def _checked_meta(key: str, packed: Tensor) -> dict:
    """The quant_state JSON of `key`, its fields checked for type and range."""
    try:
        meta = _unpack_json(packed.contiguous().view(torch.uint8))
    except (UnicodeDecodeError, ValueError, RecursionError, RuntimeError):
        raise SlimtuneError(f"{key}: not a bitsandbytes quant_state (bad JSON)") from None
    shape = meta.get("shape") if isinstance(meta, dict) else None
    if (
        not isinstance(meta, dict)
        or meta.get("quant_type") not in ("nf4", "fp4")
        or meta.get("blocksize") not in BLOCKSIZES
        or isinstance(meta.get("blocksize"), bool)
        or meta.get("dtype") not in DTYPES
        or not isinstance(shape, list)
        or not 1 <= len(shape) <= 4
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise SlimtuneError(
            f"{key}: quant_state needs quant_type nf4|fp4, blocksize in {BLOCKSIZES}, "
            f"dtype in {DTYPES} and a shape of positive ints; it has {json.dumps(meta)[:120]}"
        )
    if "nested_offset" in meta and not isinstance(meta["nested_offset"], int | float):
        raise SlimtuneError(f"{key}: quant_state nested_offset is not a number")
    return meta


def _check_sizes(where: str, meta: dict, state_dict: Mapping[str, Tensor]) -> None:
    """Each stored tensor holds exactly the elements the quant_state's shape needs."""
    n = math.prod(meta["shape"])
    blocks = -(-n // meta["blocksize"])
    nested = f"{where}.nested_absmax" in state_dict
    sizes = {where: (-(-n // 2), None), f"{where}.absmax": (blocks, torch.uint8 if nested else None),
             f"{where}.quant_map": (16, None)}  # fmt: skip
    if nested:
        sizes |= {f"{where}.nested_absmax": (-(-blocks // NESTED_BLOCKSIZE), None),
                  f"{where}.nested_quant_map": (256, None)}  # fmt: skip
    for key, (count, dtype) in sizes.items():
        tensor = state_dict.get(key)
        if tensor is None:
            raise SlimtuneError(f"{key} is missing from the bitsandbytes checkpoint")
        if key == where:
            ok = tensor.numel() * tensor.element_size() == count  # codes: bytes, any storage
        else:
            ok = tensor.numel() == count and (
                tensor.dtype == dtype if dtype else tensor.dtype.is_floating_point
            )
        if not ok:
            raise SlimtuneError(
                f"{key}: {tuple(tensor.shape)} {tensor.dtype} does not fit the quant_state "
                f"(shape {meta['shape']}, blocksize {meta['blocksize']})"
            )


def _pack_json(d: dict) -> Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def bnb_4bit_prefixes(state_dict: Mapping[str, Tensor]) -> list[str]:
    """Module names that hold a bitsandbytes 4-bit weight in `state_dict`."""
    return sorted(k.split(PACKED_KEY)[0] for k in state_dict if PACKED_KEY in k)


def quant_state_from_bnb(prefix: str, state_dict: Mapping[str, Tensor]) -> QuantState4bit:
    """The QuantState4bit of module `prefix` from its bitsandbytes entries."""
    packed = [k for k in state_dict if k.startswith(prefix + PACKED_KEY)]
    if len(packed) != 1:
        raise SlimtuneError(f"{prefix}.weight has {len(packed)} quant_state entries; 1 expected")
    meta = _checked_meta(packed[0], state_dict[packed[0]])
    quant_type, blocksize = meta["quant_type"], meta["blocksize"]
    where = f"{prefix}.weight"
    _check_sizes(where, meta, state_dict)
    if quant_type not in ("nf4", "fp4") or blocksize not in BLOCKSIZES:
        raise SlimtuneError(
            f"{where}: quant_type {quant_type!r} / blocksize {blocksize} not supported"
        )
    if not torch.equal(state_dict[f"{where}.quant_map"].float(), codebook(quant_type)):
        raise SlimtuneError(f"{where}: its quant_map is not bitsandbytes' {quant_type} codebook")
    codes = state_dict[where].contiguous().view(torch.uint8).reshape(-1)  # any quant_storage
    absmax, absmax2, offset = state_dict[f"{where}.absmax"], None, None
    if f"{where}.nested_absmax" in state_dict:
        if meta["nested_blocksize"] != NESTED_BLOCKSIZE or not torch.equal(
            state_dict[f"{where}.nested_quant_map"].float(), dynamic_map()
        ):
            raise SlimtuneError(f"{where}: nested quantization is not bitsandbytes' default")
        absmax2 = state_dict[f"{where}.nested_absmax"].float()
        offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
    dtype = getattr(torch, meta["dtype"])
    shape = torch.Size(meta["shape"])
    return QuantState4bit(quant_type, codes, absmax, shape, dtype, blocksize, absmax2, offset)


def load_bnb_4bit(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load a bitsandbytes 4-bit state dict into `model` (built from the same config).

    Every Linear named in the checkpoint as 4-bit becomes a QuantLinear holding exactly the
    stored codes and statistics; everything else loads as usual (strict: a missing or
    unexpected key is an error, except tied weights).
    """
    prefixes = bnb_4bit_prefixes(state_dict)
    used: set[str] = set()
    states = []
    for prefix in prefixes:
        state = quant_state_from_bnb(prefix, state_dict)
        bias = state_dict.get(f"{prefix}.bias")
        parent_name, _, child = prefix.rpartition(".")
        try:
            old = model.get_submodule(prefix)
        except AttributeError:
            raise SlimtuneError(f"{prefix}.weight: the model has no module {prefix}") from None
        if not isinstance(old, nn.Linear) or tuple(old.weight.shape) != tuple(state.shape):
            raise SlimtuneError(
                f"{prefix}.weight: shape {list(state.shape)} in the checkpoint, the model's "
                f"layer is {getattr(old, 'weight', None) is not None and list(old.weight.shape)}"
            )
        setattr(model.get_submodule(parent_name), child, QuantLinear(state, bias))
        used |= {k for k in state_dict if k.startswith(prefix + ".weight") or k == f"{prefix}.bias"}
        states.append(state)
    rest = {k: v for k, v in state_dict.items() if k not in used}
    try:
        missing, unexpected = model.load_state_dict(rest, strict=False)
    except RuntimeError as exc:  # a tensor whose shape does not fit
        first = str(exc).strip().splitlines()[-1].strip()
        raise SlimtuneError(f"bitsandbytes checkpoint does not fit the model: {first}") from None
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if not _is_quant_buffer(k, prefixes) and k not in tied]
    if unexpected or missing:
        raise SlimtuneError(
            f"bitsandbytes checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if states:
        first = states[0]
        setattr(model, ATTRIBUTE, {
            "quant": first.quant_type, "blocksize": first.blocksize,
            "double_quant": first.double_quant, "skip": [], "modules": len(states),
        })  # fmt: skip
    return model


def _is_quant_buffer(key: str, prefixes: list[str]) -> bool:
    return any(key.startswith(p + ".") for p in prefixes)


def bnb_4bit_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model`'s state dict with every 4-bit QuantLinear written in bitsandbytes' format."""
    out: dict[str, Tensor] = {}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for key, value in model.state_dict().items():
        if not any(key.startswith(p + ".") for p in quantized):
            out[key] = value
    for prefix, layer in quantized.items():
        state = layer.quant_state
        if not isinstance(state, QuantState4bit):
            raise SlimtuneError(f"{prefix} is int8: bitsandbytes' 4-bit format holds nf4/fp4 only")
        out |= _bnb_entries(prefix, state)
        if layer.bias is not None:
            out[f"{prefix}.bias"] = layer.bias.detach()
    return out


def _bnb_entries(prefix: str, state: QuantState4bit) -> dict[str, Tensor]:
    where = f"{prefix}.weight"
    meta = {
        "quant_type": state.quant_type, "blocksize": state.blocksize,
        "dtype": str(state.dtype).removeprefix("torch."), "shape": list(state.shape),
    }  # fmt: skip
    entries = {
        where: state.codes.reshape(-1, 1),
        f"{where}.absmax": state.absmax,
        f"{where}.quant_map": codebook(state.quant_type).clone(),
    }
    if state.double_quant:
        meta |= {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32"}
        meta["nested_offset"] = state.offset.item()
        entries[f"{where}.nested_absmax"] = state.absmax2
        entries[f"{where}.nested_quant_map"] = dynamic_map().clone()
    entries[f"{where}.quant_state.bitsandbytes__{state.quant_type}"] = _pack_json(meta)
    return entries
