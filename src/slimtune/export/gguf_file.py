"""Write a transformers Llama-family model, or a LoRA adapter, as a llama.cpp GGUF file.

GGUF (ggml's file format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is one
file: key/value metadata (hyperparameters, tokenizer, chat template), tensor infos, then the
tensor data, each aligned to 32 bytes. Tensors carry llama.cpp's names:

    model.embed_tokens          -> token_embd.weight
    model.layers.N.self_attn.q_proj -> blk.N.attn_q.weight   (k, v, o: attn_k, attn_v, attn_output)
    model.layers.N.mlp.gate_proj    -> blk.N.ffn_gate.weight (up, down: ffn_up, ffn_down)
    model.layers.N.input_layernorm  -> blk.N.attn_norm.weight, post_attention_layernorm -> ffn_norm
    model.norm -> output_norm.weight,  lm_head -> output.weight (absent when tied)

Rotary embeddings. transformers rotates the two halves of each head (`rotate_half`), llama.cpp's
`llama` architecture rotates interleaved pairs. Its converter therefore permutes the rows of
q_proj and k_proj within each head, from [x0 .. x(d/2-1) | y0 .. y(d/2-1)] to [x0 y0 x1 y1 ..]:

    W_gguf = W.reshape(heads, 2, d/2, in).transpose(1, 2).reshape(heads*d, in)

(k uses the key/value head count). transformers' GGUF loader applies the inverse, so a model
exported here reads back bit-identical in f32. `qwen2` uses NeoX rotation in llama.cpp, like
transformers: no permutation. A LoRA update B A permutes with B's rows: (P B) A = P (B A).

Q8_0 (ggml-common.h, `block_q8_0`): each run of 32 values x becomes one fp16 scale
d = max|x| / 127 and 32 int8 codes q = roundf(x / d) (halves away from zero); x' = d * q.
That is 34 bytes per 32 weights, 8.5 bits per weight.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from slimtune.errors import SlimtuneError

# transformers model_type -> llama.cpp architecture, and whether q/k rows are permuted for rope
ARCHITECTURES: dict[str, tuple[str, bool]] = {"llama": ("llama", True), "qwen2": ("qwen2", False)}
DTYPES = ("f32", "f16", "bf16", "q8_0")
Q8_0_BLOCK = 32  # values per Q8_0 block (QK8_0 in ggml)

# pre-tokenizer split regexes of known byte-level BPE vocabularies -> llama.cpp's `tokenizer.ggml.pre`
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def gguf_architecture(config) -> tuple[str, bool]:
    """(llama.cpp architecture, permute q/k?) for a transformers config, or a SlimtuneError."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise SlimtuneError(
            f"the GGUF writer does not know the architecture {model_type!r}; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise SlimtuneError(
            f"the GGUF writer supports only plain rotary embeddings; this {model_type} "
            f"model uses rope_type {rope_type!r}"
        )
    return ARCHITECTURES[model_type]


# --- tensors -----------------------------------------------------------------------------


def permute_for_rope(w: Tensor, n_head: int) -> Tensor:
    """Rows of q_proj/k_proj from rotate-half order to llama.cpp's interleaved pairs."""
    head_dim = w.shape[0] // n_head
    return (
        w.reshape(n_head, 2, head_dim // 2, *w.shape[1:])  # (H, 2, d/2, ...)
        .transpose(1, 2)  # (H, d/2, 2, ...)
        .reshape(w.shape)
    )


def unpermute_for_rope(w: Tensor, n_head: int) -> Tensor:
    """The inverse of `permute_for_rope` (what a GGUF reader applies)."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensor_name_map(arch: str, n_layers: int):
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_id, n_layers)


def gguf_name(names, hf_module: str) -> str | None:
    """llama.cpp's name for a transformers module path (e.g. 'model.layers.0.self_attn.q_proj')."""
    return names.get_name(hf_module)


def rope_heads(gguf_base: str, config) -> int | None:
    """How many heads to permute over for this tensor (None: not a q/k tensor)."""
    if gguf_base.endswith(".attn_q"):
        return config.num_attention_heads
    if gguf_base.endswith(".attn_k"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def model_tensors(state_dict: dict[str, Tensor], config) -> Iterator[tuple[str, Tensor]]:
    """(GGUF name, tensor in llama.cpp layout) for every weight of a Llama-family model."""
    arch, permute = gguf_architecture(config)
    names = tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, tensor in state_dict.items():
        module, _, suffix = key.rpartition(".")
        if module == "lm_head" and tied:
            continue
        base = gguf_name(names, module)
        if base is None:
            raise SlimtuneError(f"the GGUF writer has no llama.cpp name for the tensor {key!r}")
        heads = rope_heads(base, config) if permute else None
        if heads is not None:
            tensor = permute_for_rope(tensor, heads)
        yield f"{base}.{suffix}", tensor


# --- encodings ----------------------------------------------------------------------------


def quantize_q8_0(w: Tensor) -> Tensor:
    """GGML Q8_0 blocks of a (..., n) float tensor, n a multiple of 32 -> (..., n/32*34) uint8."""
    blocks = w.detach().float().reshape(-1, Q8_0_BLOCK)  # (B, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127  # (B, 1)
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    x = blocks * inv  # (B, 32), |x| <= 127
    a = x.abs()
    whole = a.floor()
    q = a.sub_(whole).mul_(2).floor_().add_(whole).copysign_(x)  # roundf: halves away from 0
    packed = torch.empty(blocks.shape[0], 34, dtype=torch.uint8)  # (B, 34)
    packed[:, :2] = d.to(torch.float16).view(torch.uint8)  # fp16 scale, little-endian
    packed[:, 2:] = q.to(torch.int8).view(torch.uint8)  # 32 int8 codes
    return packed.reshape(*w.shape[:-1], w.shape[-1] // Q8_0_BLOCK * 34)


def dequantize_q8_0(packed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """x = d * q for every Q8_0 block: (..., m*34) uint8 -> (..., m*32)."""
    blocks = packed.reshape(-1, 34)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (B, 1)
    q = blocks[:, 2:].contiguous().view(torch.int8).float()  # (B, 32)
    return (d * q).reshape(*packed.shape[:-1], packed.shape[-1] // 34 * 32).to(dtype)


@dataclass
class Encoded:
    data: np.ndarray  # what is written
    ggml_type: object  # gguf.GGMLQuantizationType
    fell_back: bool = False  # q8_0 asked, f16 written


def encode_tensor(tensor: Tensor, dtype: str) -> Encoded:
    """A tensor in the requested GGUF encoding; 1-D tensors (norms, biases) stay f32."""
    from gguf import GGMLQuantizationType as T

    t = tensor.detach().cpu()
    if dtype == "f32" or t.ndim == 1:
        return Encoded(t.float().numpy(), T.F32)
    if dtype == "f16":
        return Encoded(t.to(torch.float16).numpy(), T.F16)
    if dtype == "bf16":
        return Encoded(t.to(torch.bfloat16).view(torch.int16).numpy(), T.BF16)
    if t.shape[-1] % Q8_0_BLOCK:
        return Encoded(t.to(torch.float16).numpy(), T.F16, fell_back=True)
    return Encoded(quantize_q8_0(t).numpy(), T.Q8_0)


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


# --- metadata -----------------------------------------------------------------------------


def add_hyperparameters(writer, config) -> None:
    """The hyperparameters llama.cpp's `llama` and `qwen2` graphs read."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def pre_tokenizer_name(spec: dict) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json pre-tokenizer, None if unknown."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        return PRE_TOKENIZERS.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def vocabulary(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and llama.cpp token types, padded to the embedding's row count."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def merges_of(spec: dict) -> list[str]:
    merges = spec["model"].get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def add_tokenizer(writer, tokenizer, n_vocab: int, say: Callable) -> None:
    """Vocabulary, merges, token types, special ids, add_bos/eos and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not byte_level:
        kind = f"{model.get('type', type(tokenizer).__name__)}" + (
            "" if byte_level else " (no ByteLevel)"
        )
        raise SlimtuneError(
            f"the GGUF writer supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM "
            f"style); this tokenizer is {kind}"
        )
    pre = pre_tokenizer_name(spec)
    if pre is None:
        say("tokenizer: unknown pre-tokenizer, llama.cpp will split text with its 'default' rules")
        pre = "default"
    tokens, types = vocabulary(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges_of(spec))
    add_special_tokens(writer, tokenizer)


def add_special_tokens(writer, tokenizer) -> None:
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    writer.add_add_bos_token(bool(bos is not None and ids[:1] == [bos]))
    writer.add_add_eos_token(bool(eos is not None and len(ids) > 1 and ids[-1] == eos))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def copy_tokenizer_fields(writer, source_gguf) -> None:
    """Copy every `tokenizer.*` key of a source GGUF verbatim (round trip keeps its layout)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source_gguf)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), GGUFValueType.ARRAY, field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), field.types[0])


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
    arch, permute = gguf_architecture(config)
    names = tensor_name_map(arch, config.num_hidden_layers)
    alpha = float(adapter_config.get("lora_alpha", 8))
    out: list[tuple[str, Tensor]] = []
    for module, pair in sorted(lora_pairs(tensors).items()):
        base = gguf_name(names, module)
        if base is None or set(pair) != {"A", "B"}:
            raise SlimtuneError(f"gguf-lora: no llama.cpp tensor for the adapted module {module!r}")
        a, b = pair["A"].float(), pair["B"].float()  # (r, in), (out, r)
        r = a.shape[0]
        b = b * (layer_scaling(module, r, adapter_config) / (alpha / r))
        heads = rope_heads(base, config) if permute else None
        if heads is not None:
            b = permute_for_rope(b, heads)
        out += [(f"{base}.weight.lora_a", a), (f"{base}.weight.lora_b", b)]
    return alpha, out
