"""data.py: formats, loss masks (against hand-built masks), truncation, batches, bad input."""

import json

import pytest
import torch

from conftest import CHARS, SPECIAL_TOKENS
from slimtune.errors import SlimtuneError
from slimtune.training.data import (
    IGNORE_INDEX,
    Dataset,
    Example,
    batch_order,
    batches_from,
    collate,
    load_dataset,
    truncate_examples,
)

START, END = "<|im_start|>", "<|im_end|>"


def ids_of(text: str) -> list[int]:
    """Hand tokenization for the conftest char tokenizer: special tokens, else one id per char."""
    vocab = SPECIAL_TOKENS + CHARS
    out, i = [], 0
    while i < len(text):
        special = next((s for s in SPECIAL_TOKENS if text.startswith(s, i)), None)
        out.append(vocab.index(special or text[i]))
        i += len(special) if special else 1
    return out


def hand_built(pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(ids, labels) from (text, has loss) pieces."""
    ids, labels = [], []
    for text, learn in pieces:
        piece = ids_of(text)
        ids += piece
        labels += piece if learn else [IGNORE_INDEX] * len(piece)
    return ids, labels


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_completion_masks_the_prompt(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "12+3=", "completion": "15"}])
    data = load_dataset(path, tiny_tokenizer, 64)
    assert data.format == "prompt_completion"
    ids, labels = hand_built([("12+3=", False), ("15", True), (END, True)])
    assert (data.examples[0].input_ids, data.examples[0].labels) == (ids, labels)


def test_messages_mask_every_assistant_turn_and_its_end_token(tmp_path, tiny_tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok?"},
        {"role": "assistant", "content": "k"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    data = load_dataset(path, tiny_tokenizer, 256)
    ids, labels = hand_built(
        [
            (f"{START}system\nbe brief{END}\n{START}user\nhi{END}\n{START}assistant\n", False),
            (f"yo{END}", True),
            (f"\n{START}user\nok?{END}\n{START}assistant\n", False),
            (f"k{END}", True),
            ("\n", False),
        ]
    )
    assert (data.examples[0].input_ids, data.examples[0].labels) == (ids, labels)
    # the ids are exactly the chat template's own tokenization
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == ids_of(rendered)


def test_text_rows_learn_every_token_and_end(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b"}, {"text": "cd"}])
    data = load_dataset(path, tiny_tokenizer, 64)
    assert data.format == "text"
    assert [ex.labels for ex in data.examples] == [ids_of("a b" + END), ids_of("cd" + END)]
    assert all(ex.input_ids == ex.labels for ex in data.examples)


def test_txt_file_is_packed_into_max_length_chunks(tmp_path, tiny_tokenizer):
    path = tmp_path / "book.txt"
    path.write_text("abcdefg")
    data = load_dataset(path, tiny_tokenizer, 3)
    stream = ids_of("abcdefg" + END)
    assert data.format == "txt"
    assert [ex.input_ids for ex in data.examples] == [stream[0:3], stream[3:6], stream[6:8]]
    assert all(ex.input_ids == ex.labels for ex in data.examples)


def test_truncation_is_counted_in_one_line(tmp_path, tiny_tokenizer, capsys):
    rows = [
        {"prompt": "1+1=", "completion": "2"},
        {"prompt": "1+", "completion": "100000"},
        {"prompt": "long prompt=", "completion": "x"},
    ]
    data = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tiny_tokenizer, 6)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "2 of 3 rows" in out[0] and "1 dropped" in out[0]
    assert [len(ex.input_ids) for ex in data.examples] == [6, 6]
    assert data.examples[1].labels == [IGNORE_INDEX] * 2 + ids_of("1000")
    assert len(data.rows) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ',
            "d.jsonl:2: not valid JSON",
        ),
        ('{"prompt": "a", "completion": "b"}\n{"text": "a"}\n', "d.jsonl:2: fields ['text']"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', "d.jsonl:2: fields ['prompt']"),
        ('{"prompt": "a", "completion": "b", "text": "c"}\n', "d.jsonl:1: fields"),
        ('{"prompt": "a"}\n', "d.jsonl:1: a row has ['prompt']"),
        ('{"prompt": 1, "completion": "b"}\n', "d.jsonl:1: field 'prompt' must be a string"),
        ("", "d.jsonl is empty"),
        ("\n\n", "d.jsonl is empty"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "d.jsonl:1: a messages row needs"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}\n', "d.jsonl:1: role 'bot'"),
        ("[1, 2]\n", "d.jsonl:1: a row has list"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, tiny_tokenizer, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(SlimtuneError) as info:
        load_dataset(path, tiny_tokenizer, 64)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_batches_group_lengths_cover_every_row_once_and_follow_the_seed():
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    batches = batch_order(lengths, 8, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert batches == batch_order(lengths, 8, seed=3, epoch=0)
    assert batches != batch_order(lengths, 8, seed=3, epoch=1)

    def padding(order):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in order)

    plain = batch_order(lengths, 8, seed=3, epoch=0, group_by_length=False)
    assert padding(batches) < padding(plain) / 5


def test_batches_resume_at_any_micro_batch(tmp_path, tiny_tokenizer):
    rows = [{"text": "x" * (i % 7 + 1)} for i in range(10)]
    data = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tiny_tokenizer, 64)
    stream = batches_from(data, 3, seed=1, pad_id=2)
    first = [next(stream)["input_ids"] for _ in range(9)]  # 4 batches per epoch: crosses epochs
    later = batches_from(data, 3, seed=1, pad_id=2, start=5)
    assert all((next(later)["input_ids"] == first[i]).all() for i in range(5, 9))


def test_collate_pads_right_without_loss(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab"}, {"text": "abcd"}])
    batch = collate(load_dataset(path, tiny_tokenizer, 64).examples, pad_id=2)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 2


def test_truncation_counts_cut_and_dropped_rows_and_keeps_the_rest_in_order():
    ign = IGNORE_INDEX
    examples = [
        Example([1, 2, 3, 4, 5], [ign, ign, ign, ign, 5], line=1),  # cut: its loss token goes
        Example([1, 2], [ign, 2], line=2),  # kept: its one loss token is at position 1
        Example([1, 2, 3, 4, 5, 6], [ign, ign, ign, ign, ign, 6], line=3),  # cut and dropped
        Example([1, 2, 3], [ign, 2, 3], line=4),  # kept whole
    ]
    rows = [{"n": i} for i in range(4)]
    data = Dataset("d.jsonl", "prompt_completion", examples, rows)
    truncate_examples(data, 3)
    assert (data.truncated, data.dropped) == (2, 2)
    assert [ex.line for ex in data.examples] == [2, 4]
    assert data.rows == [{"n": 1}, {"n": 3}]
    txt = Dataset("d.txt", "txt", [Example([1, 2, 3], [1, 2, 3])], [])  # .txt: no rows
    truncate_examples(txt, 2)
    assert txt.rows == [] and txt.truncated == 1 and txt.examples[0].input_ids == [1, 2]
    with pytest.raises(SlimtuneError, match=r"d\.jsonl: no row has a token to learn within 1 "):
        truncate_examples(Dataset("d.jsonl", "text", [Example([1, 2], [ign, 2])], [{}]), 1)


def test_collate_gives_long_tensors_and_positions_for_unpacked_rows_beside_packed_ones():
    packed = Example([5, 6, 7, 8], [5, 6, 7, 8], position_ids=[0, 1, 0, 1])
    plain = Example([9, 10, 11], [9, 10, 11])
    batch = collate([packed, plain], pad_id=0)
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
