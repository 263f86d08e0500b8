"""The two tracebacks of issue 16, now one-line errors from the command line.

a JSONL file with one invalid UTF-8 byte   -> slimtune train: error: FILE:LINE: not UTF-8 …
a truncated .gguf model                    -> slimtune eval: error: FILE … truncated …
"""

from __future__ import annotations

import pytest

from slimtune.cli.main import main
from slimtune.models import builtin_gguf


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"slimtune {command}: error: "), err
    return err


def test_invalid_utf8_in_jsonl_names_file_and_line(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b'{"text": "hello"}\n{"text": "h\xffllo"}\n')
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out)])
    assert rc == 1
    assert f"{data}:2: not UTF-8" in one_error_line(capsys, "train")
    assert not out.exists()


@pytest.mark.parametrize("keep", [1_000, 1_000_000, 50_000_000])  # header, metadata, tensors
def test_truncated_gguf_is_one_line(keep, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "cut.gguf"
    with builtin_gguf("smollm2-135m").open("rb") as source, model.open("wb") as target:
        target.write(source.read(keep))
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "hello"}\n')
    assert main(["eval", "--model", str(model), "--data", str(data)]) == 1
    err = one_error_line(capsys, "eval")
    assert str(model) in err and "truncated" in err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
