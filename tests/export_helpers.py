"""Tiny Llama/Qwen2 models with a small byte-level BPE tokenizer, for the export tests.

The shared conftest tokenizer is character-level (WordLevel), which GGUF cannot describe;
llama.cpp's BPE vocabularies are byte-level BPE, so these tests train one (300 tokens) with
the `tokenizers` library on a few sentences, with ChatML special tokens and a chat template
that carries a default system prompt (as SmolLM2's does).
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

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=kind == "qwen2",
    )
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


def gguf_model(path: Path):
    """(model, tokenizer) read back through transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits
