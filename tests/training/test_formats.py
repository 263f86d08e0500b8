"""formats.py and readers.py: Alpaca, ShareGPT, TRL conversational, CSV, Parquet, save_to_disk
and several files, each checked against hand-built ids and loss masks."""

from pathlib import Path

import pytest
from test_data import END, START, hand_built, write_jsonl

from slimtune.errors import SlimtuneError
from slimtune.training.data import load_dataset

DOCS = Path(__file__).resolve().parents[2] / "docs" / "data"


def turn(role: str, content: str) -> str:
    return f"{START}{role}\n{content}{END}\n"


def pair(example):
    return example.input_ids, example.labels


def test_alpaca_is_a_user_turn_then_the_learned_output(tmp_path, tiny_tokenizer):
    rows = [
        {"instruction": "add", "input": "1 2", "output": "3", "system": "be exact", "id": 7},
        {"instruction": "hi", "input": "", "output": "yo"},
    ]
    data = load_dataset(write_jsonl(tmp_path / "a.jsonl", rows), tiny_tokenizer, 256)
    assert (data.format, data.source) == ("messages", "alpaca")
    first = hand_built(
        [
            (turn("system", "be exact") + turn("user", "add\n1 2") + f"{START}assistant\n", False),
            (f"3{END}", True),
            ("\n", False),
        ]
    )
    second = hand_built([(turn("user", "hi") + f"{START}assistant\n", False), (f"yo{END}", True), ("\n", False)])  # fmt: skip
    assert [pair(ex) for ex in data.examples] == [first, second]


def test_sharegpt_learns_every_gpt_turn(tmp_path, tiny_tokenizer):
    conversations = [
        {"from": "system", "value": "s"},
        {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"},
        {"from": "gpt", "value": "a2"},
    ]
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": conversations}])
    data = load_dataset(path, tiny_tokenizer, 256)
    expected = hand_built(
        [
            (turn("system", "s") + turn("user", "q1") + f"{START}assistant\n", False),
            (f"a1{END}", True),
            ("\n" + turn("user", "q2") + f"{START}assistant\n", False),
            (f"a2{END}", True),
            ("\n", False),
        ]
    )
    assert (data.source, pair(data.examples[0])) == ("sharegpt", expected)


def test_conversational_prompt_completion_learns_only_the_completion(tmp_path, tiny_tokenizer):
    row = {
        "prompt": [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
        ],
        "completion": [{"role": "assistant", "content": "a2"}],
    }
    data = load_dataset(write_jsonl(tmp_path / "c.jsonl", [row]), tiny_tokenizer, 256)
    expected = hand_built(
        [
            (turn("user", "q1") + turn("assistant", "a1") + turn("user", "q2"), False),
            (f"{START}assistant\n", False),
            (f"a2{END}", True),
            ("\n", False),
        ]
    )
    assert (data.source, pair(data.examples[0])) == ("conversational", expected)


def test_csv_parquet_and_save_to_disk_give_the_jsonl_examples(tmp_path, tiny_tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [
        {"instruction": 'say, "two"', "input": "x\ny", "output": "2"},
        {"instruction": "hi", "output": "yo"},
    ]
    reference = load_dataset(write_jsonl(tmp_path / "a.jsonl", rows), tiny_tokenizer, 256)
    (tmp_path / "a.csv").write_text(
        'instruction,input,output\n"say, ""two""","x\ny",2\nhi,,yo\n', encoding="utf-8"
    )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    found = {
        name: load_dataset(tmp_path / name, tiny_tokenizer, 256) for name in ("a.csv", "a.parquet")
    }
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "dict")
    )
    for name in ("saved", "dict"):
        found[name] = load_dataset(tmp_path / name, tiny_tokenizer, 256)
    want = [pair(ex) for ex in reference.examples]
    for name, data in found.items():
        assert [pair(ex) for ex in data.examples] == want, name
        assert data.source == "alpaca"
    assert [ex.line for ex in found["a.csv"].examples] == [3, 4]  # a cell spans two lines


def test_several_files_are_joined_in_order(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": "human", "value": "i"}, {"from": "gpt", "value": "o"}]}])  # fmt: skip
    c = write_jsonl(tmp_path / "c.jsonl", [{"text": "t"}])
    alone = [load_dataset(p, tiny_tokenizer, 64).examples[0] for p in (a, b, c)]
    data = load_dataset(f"{a},{b}, {c}", tiny_tokenizer, 64)
    assert [pair(ex) for ex in data.examples] == [pair(ex) for ex in alone]
    assert (data.format, data.source) == ("mixed", "alpaca,sharegpt,text")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.jsonl", '{"instruction": "a", "output": 3}\n', "d.jsonl:1: field 'output' must be a string"),
        ("d.jsonl", '{"instruction": "a", "output": "b"}\n{"conversations": []}\n', "d.jsonl:2: fields ['conversations'] do not match the file's format alpaca"),
        ("d.jsonl", '{"conversations": [{"from": "bot", "value": "x"}]}\n', "d.jsonl:1: 'from' 'bot' is not one of human, gpt, system"),
        ("d.jsonl", '{"conversations": [{"from": "human", "value": "x"}]}\n', "d.jsonl:1: a conversations row needs at least one 'gpt' turn"),
        ("d.jsonl", '{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]}\n', "d.jsonl:1: a completion row needs at least one assistant turn"),
        ("d.jsonl", '{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}\n{"prompt": "q", "completion": "a"}\n', "d.jsonl:2: 'prompt' must be a non-empty list"),
        ("d.csv", "instruction,output\na,b,c\n", "d.csv:2: more cells than the header has columns"),
        ("d.csv", "messages\n[{\n", "d.csv:2: column 'messages' must hold a JSON list"),
        ("d.csv", "instruction,output\n", "d.csv is empty"),
        ("d.parquet", "not parquet", "d.parquet: not a readable parquet file"),
    ],
)  # fmt: skip
def test_bad_rows_and_files_name_the_place(tmp_path, tiny_tokenizer, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(SlimtuneError) as info:
        load_dataset(tmp_path / name, tiny_tokenizer, 64)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_directory_not_from_save_to_disk_and_a_missing_file_are_named(tmp_path, tiny_tokenizer):
    with pytest.raises(SlimtuneError, match="not one written by datasets' save_to_disk"):
        load_dataset(tmp_path, tiny_tokenizer, 64)
    good = write_jsonl(tmp_path / "a.jsonl", [{"text": "t"}])
    with pytest.raises(SlimtuneError, match="data file .*nope.jsonl does not exist"):
        load_dataset(f"{good},{tmp_path / 'nope.jsonl'}", tiny_tokenizer, 64)


def test_chat_rows_without_a_template_ask_for_the_flag(tmp_path, tiny_tokenizer):
    tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = None
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}])
    with pytest.raises(SlimtuneError, match="give --chat-template chatml, llama3 or FILE.jinja"):
        load_dataset(path, tokenizer, 64)


@pytest.mark.parametrize("name", sorted(p.name for p in DOCS.iterdir()))
def test_every_example_file_in_docs_loads(name, tiny_tokenizer):
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    data = load_dataset(DOCS / name, tiny_tokenizer, 512)
    assert len(data) >= 1 and data.num_label_tokens > 0
    if name.endswith(".jsonl"):
        assert len(data) == len((DOCS / name).read_text().splitlines())
