"""GGUF tensors: the encodings slimtune writes itself, and LoRA adapters as llama.cpp reads them.

GGUF (ggml's file format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is one
file: key/value metadata (hyperparameters, tokenizer, chat template), tensor infos, then the
tensor data, each aligned to 32 bytes. Which tensors and names a model has is `gguf_arch.py`;
its tokenizer `gguf_vocab.py`; the llama.cpp-made types (q4_k_m, ...) `quantize.py`.

Q8_0 (ggml-common.h, `block_q8_0`): each run of 32 values x becomes one fp16 scale
d = max|x| / 127 and 32 int8 codes q = roundf(x / d) (halves away from zero); x' = d * q.
That is 34 bytes per 32 weights, 8.5 bits per weight. gguf-py's `gguf.quants` writes it
(numpy, bit-exact with ggml-quants.c; on a 2-core CPU 4.3x faster than the torch quantizer
slimtune had before, so that one is gone).

A llama.cpp LoRA file holds, for every adapted weight W, `W.lora_a` (r, in) and `W.lora_b`
(out, r) and one `adapter.lora.alpha`; llama.cpp adds alpha / r * B A to W at load time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from slimtune.errors import SlimtuneError
from slimtune.export.gguf_arch import permute_for_rope, rope_heads, tensor_name_map

DTYPES = ("f32", "f16", "bf16", "q8_0")  # written by slimtune (the others: quantize.py)
Q8_0_BLOCK = 32  # values per Q8_0 block (QK8_0 in ggml)


# --- encodings ----------------------------------------------------------------------------


@dataclass
class Encoded:
    data: np.ndarray  # what is written
    ggml_type: object  # gguf.GGMLQuantizationType
    fell_back: bool = False  # q8_0 asked, f16 written


def encode_tensor(tensor: Tensor, dtype: str) -> Encoded:
    """A tensor in the requested GGUF encoding; 1-D tensors (norms, biases) stay f32."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    t = tensor.detach().cpu()
    if dtype == "f32" or t.ndim == 1:
        return Encoded(t.float().numpy(), T.F32)
    if dtype == "f16":
        return Encoded(t.to(torch.float16).numpy(), T.F16)
    if dtype == "bf16":
        return Encoded(t.to(torch.bfloat16).view(torch.int16).numpy(), T.BF16)
    if t.shape[-1] % Q8_0_BLOCK:
        return Encoded(t.to(torch.float16).numpy(), T.F16, fell_back=True)
    return Encoded(quantize(t.float().numpy(), T.Q8_0), T.Q8_0)


def add_tensors(writer, tensors: Iterator[tuple[str, Tensor]], dtype: str, say: Callable) -> None:
    """Encode and queue every tensor; one line names those q8_0 could not take."""
    fell_back = []
    for name, tensor in tensors:
        enc = encode_tensor(tensor, dtype)
        fell_back += [name] if enc.fell_back else []
        writer.add_tensor(name, enc.data, raw_dtype=enc.ggml_type)  # Q8_0: shape from bytes
    if fell_back:
        shown = ", ".join(fell_back[:4]) + (", …" if len(fell_back) > 4 else "")
        say(
            f"q8_0: {len(fell_back)} tensor(s) whose rows are not a multiple of {Q8_0_BLOCK} "
            f"were written as f16: {shown}"
        )


def file_type(dtype: str) -> int:
    from gguf import LlamaFileType as F

    return {
        "f32": F.ALL_F32,
        "f16": F.MOSTLY_F16,
        "bf16": F.MOSTLY_BF16,
        "q8_0": F.MOSTLY_Q8_0,
    }[dtype]


# --- LoRA adapters ------------------------------------------------------------------------


def lora_pairs(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Group PEFT keys 'base_model.model.<module>.lora_A.weight' by module: {module: {A, B}}."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key and key.endswith(".weight"):
                module = key.split(marker)[0].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part[-1]] = tensor
                break
        else:
            raise SlimtuneError(
                f"gguf-lora: the adapter tensor {key!r} is not a LoRA A/B matrix; llama.cpp LoRA "
                "files hold only lora_A/lora_B of Linear layers (no DoRA, embeddings or "
                "modules_to_save)"
            )
    return pairs


def layer_scaling(module: str, r: int, adapter_config: dict) -> float:
    """PEFT's scaling for one module: alpha / r (alpha / sqrt(r) with rsLoRA), with patterns."""
    alpha = float(adapter_config.get("lora_alpha", r))
    for pattern, value in (adapter_config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):  # PEFT's rule: a regex on the name end
            alpha = float(value)
            break
    return alpha / (r**0.5 if adapter_config.get("use_rslora") else r)


def lora_tensors(
    tensors: dict[str, Tensor], adapter_config: dict, config
) -> tuple[float, list[tuple[str, Tensor]]]:
    """(adapter.lora.alpha, [(GGUF name, tensor)]) for a PEFT LoRA state dict.

    llama.cpp scales every pair by alpha / r with one alpha per file. A layer whose PEFT
    scaling differs (rsLoRA, alpha_pattern) has the difference folded into its B.
    """
    names = tensor_name_map(config)
    alpha = float(adapter_config.get("lora_alpha", 8))
    out: list[tuple[str, Tensor]] = []
    for module, pair in sorted(lora_pairs(tensors).items()):
        base = names.get_name(module)
        if base is None or set(pair) != {"A", "B"}:
            raise SlimtuneError(f"gguf-lora: no llama.cpp tensor for the adapted module {module!r}")
        a, b = pair["A"].float(), pair["B"].float()  # (r, in), (out, r)
        r = a.shape[0]
        b = b * (layer_scaling(module, r, adapter_config) / (alpha / r))
        heads = rope_heads(base, config)
        if heads is not None:
            b = permute_for_rope(b, heads)
        out += [(f"{base}.weight.lora_a", a), (f"{base}.weight.lora_b", b)]
    return alpha, out
