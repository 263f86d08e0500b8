"""Preference data: the tokens and answer masks equal those TRL's DPOTrainer builds from the
same rows, the implicit prompt is TRL's extract_prompt, and every bad row gets one line."""

import json

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.training.data import IGNORE_INDEX
from slimtune.training.preference import (
    collate_pairs,
    explicit_prompt,
    load_preference_data,
    pair_batches,
)

STRING_ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "five"},
    {"prompt": "Say hi: ", "chosen": "hello there", "rejected": "no"},
]
CHAT_ROWS = [
    {
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "I will not."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2+3?"},
        ],
        "chosen": [{"role": "assistant", "content": "5"}],
        "rejected": [{"role": "assistant", "content": "It is six."}],
    },
]


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def trl_tokenized(tiny_llama_dir, tmp_path, rows):
    """TRL's DPOTrainer's own tokenization of the rows: prompt_ids, chosen_ids, rejected_ids."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True,
                         bf16=False, max_length=None)  # fmt: skip
    trainer = trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir),
    )
    return [trainer.train_dataset[i] for i in range(len(rows))]


def answer_ids(example):
    return [i for i, label in zip(example.input_ids, example.labels, strict=True) if label != -100]


def test_string_pairs_tokenize_as_trl(tiny_llama_dir, tiny_tokenizer, tmp_path):
    data = load_preference_data(write(tmp_path / "p.jsonl", STRING_ROWS), tiny_tokenizer, 512)
    assert data.format == "strings" and [p.line for p in data.pairs] == [1, 2]
    for pair, theirs in zip(
        data.pairs, trl_tokenized(tiny_llama_dir, tmp_path, STRING_ROWS), strict=True
    ):
        for side in ("chosen", "rejected"):
            ours = getattr(pair, side)
            assert ours.input_ids == theirs["prompt_ids"] + theirs[f"{side}_ids"]
            assert ours.labels == [-100] * len(theirs["prompt_ids"]) + theirs[f"{side}_ids"]


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_conversational_pairs_tokenize_as_trl(implicit, tiny_llama_dir, tiny_tokenizer, tmp_path):
    rows = CHAT_ROWS
    if implicit:  # whole conversations; the prompt is the turns both share
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in CHAT_ROWS]  # fmt: skip
    data = load_preference_data(write(tmp_path / "c.jsonl", rows), tiny_tokenizer, 512)
    assert data.format == ("implicit " if implicit else "") + "conversational"
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for pair, theirs in zip(data.pairs, trl_tokenized(tiny_llama_dir, tmp_path, rows), strict=True):
        for side in ("chosen", "rejected"):
            ours, answer = getattr(pair, side), theirs[f"{side}_ids"]
            # TRL also scores the template's text after the end token ("\n"); we stop at the end
            cut = answer.index(end) + 1
            assert ours.input_ids == theirs["prompt_ids"] + answer
            assert answer_ids(ours) == answer[:cut]
            assert ours.labels[len(theirs["prompt_ids"]) :][:cut] == answer[:cut]
    # the earlier assistant turn of the second prompt ("hello") is context, not an answer
    assert tiny_tokenizer.decode(answer_ids(data.pairs[1].chosen)) == "5<|im_end|>"


@pytest.mark.parametrize(
    "row",
    [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "Q: hi A: hello", "rejected": "Q: hi A: go away"},
        {"chosen": "abc", "rejected": "xyz"},
    ],
)
def test_implicit_string_prompt_is_trls_extract_prompt(row):
    trl = pytest.importorskip("trl")
    assert explicit_prompt(row, "f:1") == trl.extract_prompt(row)


def test_pairs_are_cut_to_max_length_and_batched_chosen_first(tiny_tokenizer, tmp_path):
    rows = [*STRING_ROWS, {"prompt": "x" * 30, "chosen": "a", "rejected": "b"}]
    data = load_preference_data(write(tmp_path / "p.jsonl", rows), tiny_tokenizer, 12, quiet=True)
    assert (data.truncated, data.dropped, len(data)) == (2, 1, 2)  # the long prompt left no answer
    assert all(len(s.input_ids) <= 12 for p in data.pairs for s in (p.chosen, p.rejected))
    batch = collate_pairs(data.pairs, pad_id=0)
    assert batch["input_ids"].shape[0] == 4
    assert (
        batch["input_ids"][0, : len(data.pairs[0].chosen.input_ids)].tolist()
        == data.pairs[0].chosen.input_ids
    )
    assert (
        batch["labels"][2, : len(data.pairs[0].rejected.labels)].tolist()
        == data.pairs[0].rejected.labels
    )
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    first = next(pair_batches(data, 2, seed=0, pad_id=0, start=3))  # epoch 1, as data.batches_from
    again = next(pair_batches(data, 2, seed=0, pad_id=0, start=3))
    assert all(torch.equal(first[k], again[k]) for k in first)


CHAT = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
GOOD = json.dumps(STRING_ROWS[0])
BAD = {
    "not json": ([GOOD, '{"prompt": '], "p.jsonl:2: not valid JSON"),
    "sft row": (['{"prompt": "a", "completion": "b"}'], "p.jsonl:1: a preference row has ['completion', 'prompt']"),
    "not an object": (["[1, 2]"], "p.jsonl:1: a preference row has list"),
    "mixed types": ([{"prompt": "q", "chosen": CHAT, "rejected": "x"}], "p.jsonl:1: prompt/chosen/rejected must all be strings or all be message lists"),
    "format change": ([GOOD, {"chosen": "ab", "rejected": "ac"}], "p.jsonl:2: this row's format is implicit strings, the file's (strings)"),
    "same answers": ([{"prompt": "q", "chosen": "a", "rejected": "a"}], "p.jsonl:1: 'chosen' and 'rejected' are the same"),
    "no assistant": ([{"prompt": CHAT[:1], "chosen": CHAT[:1], "rejected": CHAT[1:]}], "p.jsonl:1: 'chosen' has no assistant turn"),
    "bad role": ([{"prompt": [{"role": "bot", "content": "q"}], "chosen": CHAT[1:], "rejected": CHAT[1:] * 2}], "p.jsonl:1: 'prompt': role 'bot' is not one of"),
    "no content": ([{"prompt": [{"role": "user"}], "chosen": CHAT[1:], "rejected": CHAT[1:] * 2}], "p.jsonl:1: 'prompt': each message needs a string 'content'"),
    "implicit, nothing left": ([{"chosen": CHAT, "rejected": CHAT + CHAT[:1]}], "p.jsonl:1: after the turns both share, 'chosen' has no assistant turn left"),
    "implicit prefix": ([{"chosen": "abc", "rejected": "abcd"}], "p.jsonl:1: one of 'chosen' and 'rejected' starts the other"),
    "empty": ([], "p.jsonl is empty"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rows_get_one_line_naming_file_and_line(case, tiny_tokenizer, tmp_path):
    lines, expected = BAD[case]
    path = write(tmp_path / "p.jsonl", lines)
    with pytest.raises(SlimtuneError) as info:
        load_preference_data(path, tiny_tokenizer, 64)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_invalid_utf8_names_the_line(tiny_tokenizer, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(SlimtuneError, match=r"p.jsonl:2: not UTF-8 text"):
        load_preference_data(path, tiny_tokenizer, 64)
