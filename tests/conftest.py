"""Shared fixtures: a tiny random Llama with a character-level tokenizer, saved as a directory.

The tokenizer is built here with the `tokenizers` library (no hub): one token per
character of printable ASCII plus newline, and the ChatML special tokens that
SmolLM2 uses (`<|im_start|>`, `<|im_end|>`; `<|im_end|>` is the end token).
Its chat template is ChatML without a system prompt:

    <|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\nyo<|im_end|>\\n

Fixtures:
  tiny_llama_dir       a session-wide model directory (treat it as read-only)
  make_tiny_llama_dir  a factory: make_tiny_llama_dir(path, seed=0, **llama_config) -> path
  tiny_tokenizer       the tokenizer of that directory
  tiny_llama           a fresh (model, tokenizer) pair loaded from tiny_llama_dir
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads that
# spin-wait for each other make every small matmul many times slower.
torch.set_num_threads(1)

SPECIAL_TOKENS = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_char_tokenizer():
    """A character-level PreTrainedTokenizerFast with ChatML special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama_dir(path: Path, *, seed: int = 0, **llama_config) -> Path:
    """Save a tiny random LlamaForCausalLM (safetensors) and the char tokenizer into `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_char_tokenizer()
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(llama_config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def make_tiny_llama_dir(tmp_path) -> Callable[..., Path]:
    def make(path: Path | None = None, **kwargs) -> Path:
        return build_tiny_llama_dir(path or tmp_path / "tiny-llama", **kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)
