"""Tiny Llama/Qwen2 models with a small byte-level BPE tokenizer, for the export tests.

The shared conftest tokenizer is character-level (WordLevel), which GGUF cannot describe;
llama.cpp's BPE vocabularies are byte-level BPE, so these tests train one (300 tokens) with
the `tokenizers` library on a few sentences, with ChatML special tokens and a chat template
that carries a default system prompt (as SmolLM2's does). Beside them: SentencePiece
tokenizers and the other families' tiny models, a PEFT LoRA with random B, and gguf-py's reader.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYSTEM = "You are a tiny test model"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model learns to count: one two three four five six seven.",
    "Hello world, the weather is fine today and the sky is blue.",
    "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\nFour.<|im_end|>",
] * 8
HELD_OUT = "The lazy fox counts one two three and the sky is blue today."
TINY_SIZES = dict(  # every tiny model's shape: 2 layers of 64, 4 query heads sharing 2 kv heads
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def build_bpe_tokenizer():
    """A byte-level BPE PreTrainedTokenizerFast (GPT-2 pre-tokenizer) with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TRAIN_TEXT, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(kind: str, vocab_size: int, *, seed: int = 0, **overrides):
    """A tiny random LlamaForCausalLM (untied head) or Qwen2ForCausalLM (tied, q/k/v biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    settings = dict(vocab_size=vocab_size, **TINY_SIZES, tie_word_embeddings=kind == "qwen2")
    settings.update(overrides)
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**settings))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**settings))
        with torch.no_grad():  # biases start at zero: make them matter
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0, 0.5)
    return model.eval()


def fit(model, tokenizer, steps: int = 40) -> None:
    """A few Adam steps on TRAIN_TEXT, so that perplexity means something."""
    ids = tokenizer(" ".join(TRAIN_TEXT[:4]), return_tensors="pt").input_ids
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()


def save_model_dir(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def perplexity(model, tokenizer, text: str = HELD_OUT) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return float(torch.exp(model(ids, labels=ids).loss))


def gguf_model(path: Path, config=None):
    """(model, tokenizer) read back through transformers' own GGUF loader; `config` stands in
    for the one it derives, where its key mapping is incomplete (Qwen3's head_dim, ...)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {} if config is None else {"config": config}
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **extra
    )
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def gguf_reader(path: Path):
    """gguf-py's GGUFReader on `path`: the reference reader of GGUF files."""
    from gguf import GGUFReader

    return GGUFReader(path)


def peft_adapter(model, path: Path, **lora):
    """A PEFT LoRA on `model` with random B (PEFT starts B at zero), saved to `path`.

    r 4, alpha 8 on q/k/v/o unless `lora` (peft.LoraConfig's fields) says otherwise.
    """
    import peft

    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    settings.update(lora)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**settings))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    wrapped.save_pretrained(path)
    return wrapped


# --- SentencePiece tokenizers and the other families ------------------------------------------

# chat templates in the shape of the real ones (Mistral v0.1 / Gemma / Phi-3), cut to the turns
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + "
    "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)
SPM_STYLES = {  # style -> (tokenizer class, specials, dummy prefix, added tokens, template)
    "llama": ("LlamaTokenizer", ("<unk>", "<s>", "</s>", None), True, [], MISTRAL_TEMPLATE),
    "gemma": (
        "GemmaTokenizer",
        ("<unk>", "<bos>", "<eos>", "<pad>"),
        False,
        ["<start_of_turn>", "<end_of_turn>"],
        GEMMA_TEMPLATE,
    ),
    "phi3": (
        "LlamaTokenizer",
        ("<unk>", "<s>", "<|endoftext|>", "<|endoftext|>"),
        True,
        ["<|user|>", "<|assistant|>", "<|end|>", "<|system|>"],
        PHI3_TEMPLATE,
    ),
}


FAMILY_STYLE = {  # family -> the SPM_STYLES tokenizer its tiny model is given
    "mistral": "llama",
    "qwen3": "phi3",
    "phi3": "phi3",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
}


def spm_tokenizers(root: Path) -> dict:
    """style -> SentencePiece tokenizer (Llama 2 / Mistral, Gemma, Phi-3 shaped), under `root`."""
    return {style: build_spm_tokenizer(style, root / style) for style in SPM_STYLES}


def build_spm_tokenizer(style: str, folder: Path):
    """A SentencePiece BPE model (byte fallback, 400 pieces) trained on TRAIN_TEXT, loaded by
    transformers from `folder`/tokenizer.model as Llama 2 / Mistral, Gemma or Phi-3 ship it."""
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    cls, (unk, bos, eos, pad), dummy_prefix, added, template = SPM_STYLES[style]
    folder.mkdir(parents=True, exist_ok=True)
    user = [t for t in added if style == "gemma"]  # Gemma's turn markers live in the .model
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_piece=unk,
        bos_piece=bos,
        eos_piece=eos,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3 if style == "gemma" else -1,
        pad_piece=pad or "<pad>",
        user_defined_symbols=user,
        add_dummy_prefix=dummy_prefix,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    config = {"tokenizer_class": cls, "bos_token": bos, "eos_token": eos, "unk_token": unk}
    config |= {"pad_token": pad} if pad else {}
    config |= {"chat_template": template, "add_bos_token": True, "add_eos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    extra = [t for t in added if t not in user]
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer


FAMILY_CONFIGS = {  # model_type -> (transformers class names, extra config)
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8},
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"original_max_position_embeddings": 256}),
}


def build_family_model(kind: str, tokenizer, *, seed: int = 0):
    """A tiny random model of one of FAMILY_CONFIGS, its norms and biases made to matter."""
    import transformers

    config_name, model_name, extra = FAMILY_CONFIGS[kind]
    settings = dict(
        vocab_size=len(tokenizer),
        **TINY_SIZES,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = getattr(transformers, config_name)(**settings, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma): make them matter
        for param in model.parameters():
            if param.ndim == 1:
                param.normal_(0, 0.3).add_(0 if kind.startswith("gemma") else 1)
    return model.eval()
