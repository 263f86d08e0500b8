"""The model families slimtune writes as GGUF: llama.cpp's architecture, hyperparameters and
tensor layout for each, in one table (FAMILIES), as llama.cpp's convert_hf_to_gguf.py writes them.

Tensor names come from gguf-py's own map (`gguf.get_tensor_name_map`), per architecture:

    model.embed_tokens              -> token_embd.weight
    model.layers.N.self_attn.q_proj -> blk.N.attn_q.weight   (Phi-3's fused qkv_proj: attn_qkv)
    model.layers.N.mlp.down_proj    -> blk.N.ffn_down.weight (Phi-3's fused gate_up_proj: ffn_up)
    model.layers.N.input_layernorm  -> blk.N.attn_norm.weight ...
    model.norm -> output_norm.weight,  lm_head -> output.weight (absent when tied)

What a family changes beyond the names:

- Rotary embeddings. transformers rotates the two halves of each head (`rotate_half`);
  llama.cpp's `llama` architecture (Llama, Mistral, SmolLM2) rotates interleaved pairs, so its
  converter permutes the rows of q_proj and k_proj within each head, from
  [x0 .. x(d/2-1) | y0 .. y(d/2-1)] to [x0 y0 x1 y1 ..]:

      W_gguf = W.reshape(heads, 2, d/2, in).transpose(1, 2).reshape(heads*d, in)

  (k uses the key/value head count). The other families use NeoX rotation in llama.cpp, like
  transformers: no permutation. A LoRA update B A permutes with B's rows: (P B) A = P (B A).
- Gemma's RMSNorm computes x * (1 + w); llama.cpp's computes x * w, so every norm weight is
  written as 1 + w.
- Gemma 2/3 and Phi-3 carry their sliding window, soft-capping and partial-rotary keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from torch import Tensor

from slimtune.errors import SlimtuneError


@dataclass(frozen=True)
class Family:
    arch: str  # llama.cpp architecture (general.architecture)
    permute_qk: bool  # q/k rows to interleaved rope pairs (llama.cpp's `llama` graph)
    norm_offset: float = 0.0  # added to every norm weight (Gemma: x * (1 + w))
    always_tied: bool = False  # llama.cpp reads no output.weight (Gemma 2)
    extra: Callable[..., None] | None = None  # family-specific keys: extra(writer, config)


def _gemma2(writer, config) -> None:
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    _sliding_window(writer, config)


def _gemma3(writer, config) -> None:
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    _sliding_window(writer, config)


def _sliding_window(writer, config) -> None:
    """The window and which layers use it (llama.cpp's is_swa per layer)."""
    layer_types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in layer_types and config.sliding_window:
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])


def _phi3(writer, config) -> None:
    rope = config.rope_parameters or {}
    original = rope.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", config.max_position_embeddings
    )
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)


# transformers model_type -> how llama.cpp names and computes it
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", permute_qk=True),  # Llama 2/3, SmolLM2
    "mistral": Family("llama", permute_qk=True),  # llama.cpp runs Mistral as `llama`
    "qwen2": Family("qwen2", permute_qk=False),
    "qwen3": Family("qwen3", permute_qk=False),
    "gemma": Family("gemma", permute_qk=False, norm_offset=1.0, always_tied=True),
    "gemma2": Family("gemma2", False, norm_offset=1.0, always_tied=True, extra=_gemma2),
    "gemma3_text": Family("gemma3", permute_qk=False, norm_offset=1.0, extra=_gemma3),
    "phi3": Family("phi3", permute_qk=False, extra=_phi3),
}
ROPE_TYPES = ("default", "linear")


def _rope_layers(config) -> dict[str, dict]:
    """rope_parameters by attention kind: {'full_attention': {...}, 'sliding_attention'?: {...}}."""
    rope = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rope:
        return rope
    return {"full_attention": rope}


def family_of(config) -> Family:
    """The Family of a transformers config, or one line listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise SlimtuneError(
            f"GGUF export does not support the architecture {model_type!r}; "
            f"supported: {', '.join(FAMILIES)}"
        )
    for kind, rope in _rope_layers(config).items():
        rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
        if rope_type not in ROPE_TYPES:
            raise SlimtuneError(
                f"GGUF export supports rope_type {' or '.join(ROPE_TYPES)}; this {model_type} "
                f"model's {kind} uses {rope_type!r}"
            )
    return FAMILIES[model_type]


# --- hyperparameters ---------------------------------------------------------------------


def add_hyperparameters(writer, config) -> None:
    """The keys llama.cpp's graph for this family reads (TextModel.set_gguf_parameters + extra)."""
    from gguf import RopeScalingType

    family = family_of(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = _rope_layers(config)
    full = rope["full_attention"]
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(full.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    if "sliding_attention" in rope:
        writer.add_rope_freq_base_swa(float(rope["sliding_attention"]["rope_theta"]))
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    partial = full.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None)
    writer.add_rope_dimension_count(int((partial or 1.0) * head_dim))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if family.extra is not None:
        family.extra(writer, config)


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


def tensor_name_map(config):
    """gguf-py's TensorNameMap for this config's llama.cpp architecture."""
    import gguf

    arch = family_of(config).arch
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)


def rope_heads(gguf_base: str, config) -> int | None:
    """How many heads to permute over for this tensor (None: not a permuted q/k tensor)."""
    if not family_of(config).permute_qk:
        return None
    if gguf_base.endswith(".attn_q"):
        return config.num_attention_heads
    if gguf_base.endswith(".attn_k"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def model_tensors(
    state_dict: dict[str, Tensor] | Iterable[tuple[str, Tensor]], config
) -> Iterator[tuple[str, Tensor]]:
    """(GGUF name, tensor in llama.cpp layout) for every weight of a supported model.

    `state_dict` is a state dict, or (name, tensor) pairs made one at a time (a streamed merge).
    """
    family = family_of(config)
    names = tensor_name_map(config)
    tied = family.always_tied or bool(getattr(config, "tie_word_embeddings", False))
    pairs = state_dict.items() if isinstance(state_dict, dict) else state_dict
    for key, tensor in pairs:
        module, _, suffix = key.rpartition(".")
        if module == "lm_head" and tied:
            continue
        base = names.get_name(module)
        if base is None:
            raise SlimtuneError(f"the GGUF writer has no llama.cpp name for the tensor {key!r}")
        heads = rope_heads(base, config)
        if heads is not None:
            tensor = permute_for_rope(tensor, heads)
        if family.norm_offset and module.endswith("norm"):
            tensor = tensor.float() + family.norm_offset
        yield f"{base}.{suffix}", tensor
