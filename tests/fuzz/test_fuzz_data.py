"""Fuzzed data files: a damaged .jsonl, .txt, .csv or .parquet file either loads or fails
with one SlimtuneError line naming the file (and the line, where a line is at fault)."""

from __future__ import annotations

import json

import pytest
from fuzz_bytes import damaged, examples, json_values
from hypothesis import given
from hypothesis import strategies as st

from slimtune.errors import SlimtuneError
from slimtune.training.data import load_dataset

ROWS = [
    {"prompt": "2+2=", "completion": "4"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    {"text": "plain text"},
    {"instruction": "add", "input": "1 1", "output": "2"},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
]
GOOD = {
    ".jsonl": b"".join(json.dumps(r).encode() + b"\n" for r in ROWS[:1] * 3),
    ".txt": "Some text, some more text.\nAnd a second line: é ü 字.\n".encode(),
    ".csv": b'prompt,completion\n"2+2=",4\n"a, b",c\n',
}


def loads_or_names_the_file(path, tokenizer) -> None:
    """The only outcomes allowed: a dataset, or one SlimtuneError line naming the file."""
    try:
        data = load_dataset(path, tokenizer, max_length=64, quiet=True)
    except SlimtuneError as exc:
        message = str(exc)
        assert str(path) in message and "\n" not in message, message
        return
    assert len(data) > 0


@pytest.mark.parametrize("suffix", sorted(GOOD))
@examples(60)
@given(data=st.data())
def test_damaged_data_file(suffix, data, tmp_path, tiny_tokenizer):
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(data.draw(damaged(GOOD[suffix])))
    loads_or_names_the_file(path, tiny_tokenizer)


@examples(80)
@given(row=st.integers(0, len(ROWS) - 1), key=st.data(), value=json_values())
def test_wrong_types_in_a_row(row, key, value, tmp_path, tiny_tokenizer):
    """Every field of every format given a value of any JSON type."""
    bad = dict(ROWS[row])
    bad[key.draw(st.sampled_from(sorted(bad)))] = value
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[row]) + "\n" + json.dumps(bad) + "\n")
    loads_or_names_the_file(path, tiny_tokenizer)


@examples(40)
@given(text=st.text(max_size=40))
def test_any_string_in_a_text_row(text, tmp_path, tiny_tokenizer):
    """Unpaired surrogates (\\ud800), NUL, control characters … in a valid JSON string."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    loads_or_names_the_file(path, tiny_tokenizer)


def test_deep_nesting_and_huge_numbers_name_the_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "rows.jsonl"
    for line in ("[" * 100_000 + "]" * 100_000, '{"text": ' + "9" * 5000 + "}"):
        path.write_text('{"text": "ok"}\n' + line + "\n")
        with pytest.raises(SlimtuneError, match=f"{path}:2: not valid JSON"):
            load_dataset(path, tiny_tokenizer, max_length=64)


def test_damaged_parquet(tmp_path, tiny_tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": ["2+2=", "3+3="], "completion": ["4", "6"]}), good)
    blob = good.read_bytes()

    @examples(60)
    @given(bad=damaged(blob))
    def check(bad):
        path = tmp_path / "rows.parquet"
        path.write_bytes(bad)
        loads_or_names_the_file(path, tiny_tokenizer)

    check()
