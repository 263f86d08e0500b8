"""The data masks token by token, against sequences written out by hand (char tokenizer:
one token per character; ChatML turns) and against the tokenizer's own special tokens."""

from __future__ import annotations

import pytest

from conftest import build_char_tokenizer
from slimtune.errors import SlimtuneError
from slimtune.training.data import (
    IGNORE_INDEX,
    load_dataset,
    pack_text_file,
    tokenize_messages,
    tokenize_prompt_completion,
    tokenize_text,
)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    """The char tokenizer with a BOS that `tokenizer(text)` adds, as Llama's does."""
    from tokenizers import processors

    tokenizer = build_char_tokenizer()
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    assert tokenizer("ab")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


def chars(tok, text: str) -> list[int]:
    vocab = tok.get_vocab()
    return [vocab[c] for c in text]


def by_hand(tok, messages, trained=lambda i: True) -> tuple[list[int], list[int]]:
    """ChatML tokens and labels: an assistant turn's content and <|im_end|> carry the loss."""
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids, labels = [], []
    for i, turn in enumerate(messages):
        head = [start, *chars(tok, turn["role"] + "\n")]
        body = [*chars(tok, turn["content"]), end]
        learn = turn["role"] == "assistant" and trained(i)
        ids += head + body + chars(tok, "\n")
        labels += [IGNORE_INDEX] * len(head) + (body if learn else [IGNORE_INDEX] * len(body))
        labels += [IGNORE_INDEX]
    return ids, labels


def test_text_and_prompts_start_with_the_tokenizers_bos(bos_tok):
    bos, eos = bos_tok.bos_token_id, bos_tok.eos_token_id
    assert tokenize_text(bos_tok, "hi").input_ids == [bos, *chars(bos_tok, "hi"), eos]
    example = tokenize_prompt_completion(bos_tok, "1+1=", "2")
    assert example.input_ids == [bos, *chars(bos_tok, "1+1="), *chars(bos_tok, "2"), eos]
    assert example.labels == [IGNORE_INDEX] * 5 + [*chars(bos_tok, "2"), eos]


def test_a_text_file_is_packed_with_bos_and_a_lone_last_token_dropped(bos_tok, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefg")  # bos + 7 chars + eos = 9 tokens = 4 + 4 + 1
    chunks = pack_text_file(bos_tok, path, 4)
    stream = [bos_tok.bos_token_id, *chars(bos_tok, "abcdefg"), bos_tok.eos_token_id]
    assert [c.input_ids for c in chunks] == [stream[:4], stream[4:8]]  # 1 token: nothing to learn
    assert all(c.labels == c.input_ids for c in chunks)
    path.write_text("abcdef")  # 8 tokens: two full chunks
    assert len(pack_text_file(bos_tok, path, 4)) == 2
    path.write_text("abcdefgh")  # 10 tokens: the last chunk of 2 stays
    assert [len(c.input_ids) for c in pack_text_file(bos_tok, path, 4)] == [4, 4, 2]


def test_text_file_errors_name_the_file(tok, tmp_path):
    empty, binary = tmp_path / "empty.txt", tmp_path / "bad.txt"
    empty.write_text("  \n")
    binary.write_bytes(b"ok\n\xff\xfe")
    with pytest.raises(SlimtuneError, match=f"{empty} is empty"):
        load_dataset(empty, tok, 16)
    with pytest.raises(SlimtuneError, match=f"{binary}:2: not UTF-8"):
        load_dataset(binary, tok, 16)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "as"}],  # in the header
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "ok"},
         {"role": "user", "content": "b"}, {"role": "assistant", "content": "ok"}],  # twice
        [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "x"},
         {"role": "assistant", "content": "y"}],  # the assistant speaks first
    ],
)  # fmt: skip
def test_messages_labels_are_each_assistant_turn(tok, messages):
    example = tokenize_messages(tok, messages)
    assert (example.input_ids, example.labels) == by_hand(tok, messages)


def test_prompt_turns_are_context_only(tok):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]  # fmt: skip
    for prompt_turns, first_trained in ((0, 0), (1, 1), (2, 2), (3, 3), (4, 4)):
        example = tokenize_messages(tok, messages, prompt_turns=prompt_turns)
        assert (example.input_ids, example.labels) == by_hand(
            tok, messages, trained=lambda i, first=first_trained: i >= first
        ), prompt_turns


def test_a_template_that_is_not_prefix_by_prefix_is_refused(tok):
    import copy

    odd = copy.deepcopy(tok)
    odd.chat_template = (  # the number of turns first: the prefix renders differently
        "{{ messages|length }}{% for m in messages %}{{ m['role'] + ':' + m['content'] + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(SlimtuneError, match="^the chat template does not render conversations"):
        tokenize_messages(odd, messages)


def test_exact_match_shows_each_prompt_as_the_model_read_it_bos_included(
    bos_tok, tiny_llama, tmp_path
):
    """evaluate.exact_match: the prompt of each row is decoded with its special tokens."""
    import json

    from slimtune.evaluate import exact_match

    model, _ = tiny_llama  # the same vocabulary as the char tokenizer
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    data = load_dataset(path, bos_tok, 64)
    _, rows = exact_match(model, bos_tok, data)
    assert rows[0]["prompt"] == f"{bos_tok.bos_token}1+1="
