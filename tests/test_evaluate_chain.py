"""Exact match and generation on a model whose every answer is known in advance.

The "chain" model is a Llama with no decoder layers, one-hot embeddings and an output layer
that is a lookup table: the next token depends only on the current one (NEXT below). Its
greedy answer to any prompt is a walk through NEXT, computed here in plain Python without
the model, so exact match has an independent count, and the end token really is emitted
(after it, NEXT would go on with "xxxx": a generate that missed the end token shows it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import build_char_tokenizer
from slimtune.cli.main import main
from slimtune.evaluate import evaluate, generate
from slimtune.training.data import load_dataset

EOS = "<|im_end|>"
# '=' → "42", '?' → "no", the chat template's last "\n" → "hi"; then the end token; after
# the end token (and from any other token) "x" forever
NEXT = {"=": "4", "4": "2", "2": EOS, "?": "n", "n": "o", "o": EOS, "\n": "h", "h": "i", "i": EOS}


def walk(last: str, limit: int) -> str:
    """The chain's greedy continuation of a prompt ending in `last`, up to the end token."""
    text, token = "", last
    for _ in range(limit):
        token = NEXT.get(token, "x")
        if token == EOS:
            break
        text += token
    return text


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_char_tokenizer()
    vocab = tokenizer.get_vocab()
    n = len(tokenizer)
    config = LlamaConfig(vocab_size=n, hidden_size=n + 1, intermediate_size=4, num_hidden_layers=0,
                         num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(n, n + 1))  # one-hot (+1: even RoPE)
        table = torch.zeros(n, n + 1)
        for token, index in vocab.items():
            table[vocab[NEXT.get(token, "x")], index] = 1.0
        model.lm_head.weight.copy_(table)
    path = tmp_path_factory.mktemp("chain")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def chain(chain_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(chain_dir), AutoTokenizer.from_pretrained(chain_dir)


ROWS = [("a=", "42"), ("b=", " 42 "), ("cc=", "43"), ("d?", "no"), ("e?", "n"), ("f?", "nope"),
        ("g=", "4"), ("h?", "yes")]  # fmt: skip


def test_exact_match_through_evaluate_equals_an_independent_count(chain, tmp_path):
    model, tokenizer = chain
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in ROWS))
    matched = sum(walk(p[-1], 10).strip().startswith(c.strip()) for p, c in ROWS)
    assert matched == 5  # the count itself, written out: a=, b=, d?, e?, g=
    result = evaluate(model, tokenizer, load_dataset(path, tokenizer, 64), batch_size=3)
    assert result["exact_match"] == matched / len(ROWS)
    assert [e["match"] for e in result["examples"]] == [
        walk(p[-1], 10).strip().startswith(c.strip()) for p, c in ROWS
    ]
    assert [e["prediction"] for e in result["examples"]] == [walk(p[-1], 10) for p, _ in ROWS]


def test_generate_stops_at_the_end_token(chain, chain_dir, capsys):
    model, tokenizer = chain
    assert walk("\n", 20) == "hi" and walk(EOS, 3) == "xxx"  # what missing the stop would add
    assert generate(model, tokenizer, "hello", max_new_tokens=20) == "hi"
    assert generate(model, tokenizer, "what=", max_new_tokens=20, raw=True) == "42"
    argv = ["generate", "--model", str(chain_dir), "--prompt", "hello", "--max-new-tokens", "20"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "hi\n"


def test_evaluate_counts_formats_and_the_exact_match_switch(chain, tmp_path):
    model, tokenizer = chain
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in ROWS))
    data = load_dataset(path, tokenizer, 64)
    result = evaluate(model, tokenizer, data)
    # scored tokens: each completion's characters and its end token (one token per char)
    assert result["tokens"] == sum(len(c) + 1 for _, c in ROWS)
    assert result["format"] == "prompt_completion" and result["rows"] == len(ROWS)
    assert "exact_match" not in evaluate(model, tokenizer, data, with_exact_match=False)
    chat = tmp_path / "chat.jsonl"
    rows = [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": answer}]
            for answer in ("hi", "no", "hi there")]  # fmt: skip
    chat.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    result = evaluate(model, tokenizer, load_dataset(chat, tokenizer, 64))
    assert result["format"] == "messages"
    assert result["exact_match"] == 1 / 3  # walk("\n") is "hi": it starts only the first
    assert result["tokens"] == sum(len(m[-1]["content"]) + 1 for m in rows)


def test_the_default_stride_is_half_the_window(tiny_llama, tmp_path):
    from test_evaluate import hand_sliding_loss

    model, tokenizer = tiny_llama
    path = tmp_path / "book.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 2)
    ids = tokenizer(path.read_text())["input_ids"] + [tokenizer.eos_token_id]
    result = evaluate(model, tokenizer, path, max_length=24)
    assert abs(result["loss"] - hand_sliding_loss(model, ids, 24, 12)) < 1e-5 * result["loss"]
    assert abs(result["loss"] - hand_sliding_loss(model, ids, 24, 8)) > 1e-4  # stride matters
