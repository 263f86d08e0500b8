"""Tiny random transformers models shared by the method tests (no hub, seeded, in eval mode).

Each builder seeds torch with `seed` right before building, so two calls with the same
arguments give identical weights. Sizes are the ones the tests were written against; pass
keyword overrides (e.g. `tiny_gpt2(n_positions=32)`, `tiny_llama(pad_token_id=0)`) rather
than changing the defaults, because a different config draws different random weights.
"""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """LlamaForCausalLM: vocab 64, hidden 32, MLP 64, 2 layers, 4 heads, 2 KV heads."""
    settings = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def tiny_gpt2(seed: int = 0, *, n_positions: int = 64) -> GPT2LMHeadModel:
    """GPT2LMHeadModel: vocab 64, width 32, 2 layers, 4 heads, `n_positions` positions."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=n_positions)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    """BertModel without pooler: vocab 64, hidden 32, MLP 64, 2 layers, 4 heads, 64 positions."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config, add_pooling_layer=False).eval()


FAMILY_SIZES = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip


def family_model(name: str, **overrides) -> torch.nn.Module:
    """A tiny random causal LM of the family (fp32, CPU); `overrides` change FAMILY_SIZES."""
    import transformers as tf

    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 64}),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 64}),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 64}),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 64}),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": 0}),
    }
    config_class, model_class, extra = configs[name]
    torch.manual_seed(0)
    return model_class(config_class(**{**FAMILY_SIZES, **extra, **overrides})).eval()


# the families the fast path covers (kernels/llama_ops.py)
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]


def trained_qlora(model_dir, quant: str = "nf4", dtype: torch.dtype = torch.float32):
    """A QLoRA model (q_proj, up_proj; r 4) on the Llama saved in `model_dir`, quantized to
    `quant`, whose B matrices are non-zero (as after training); returned in fp32."""
    import slimtune as st

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    st.quantize_model(model, quant)
    st.add_adapter(model, st.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model.float()


def lora_everywhere(model: torch.nn.Module, b_std: float) -> torch.nn.Module:
    """LoRA r=4 α=8 on every linear layer, with B drawn from N(0, b_std) instead of zeros, so
    that the adapters change the logits and every gradient (the kernel tests' model)."""
    import slimtune as st

    model = st.add_adapter(model, st.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=b_std)
    return model


def logits_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One forward and backward of the causal-LM loss: (logits, {trainable name: gradient})."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads
