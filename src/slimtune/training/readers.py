"""Data files to rows: JSONL, CSV, Parquet, a `datasets.save_to_disk` directory, or several
files at once (`--data a.jsonl,b.parquet`).

    read_source("a.jsonl,b.csv") -> [Record(where="a.jsonl:1", line=1, row={…}, fmt=…), …]

Each file's format is detected from its first row and every row is checked against it
(formats.py). A record's `where` names the file and the line (JSONL, CSV) or the row
number (Parquet, Arrow), so every error points at the row at fault. Parquet and Arrow are
read with pyarrow (the `data` extra; no pandas); CSV with the standard library, every cell
a string; a `messages` or `conversations` cell in a CSV file holds that list as JSON.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtune.errors import SlimtuneError
from slimtune.file_checks import decode_utf8
from slimtune.training.formats import ACCEPTED, RowFormat, check_row, detect_format

TABULAR = (".csv", ".parquet", ".arrow")
JSON_CELLS = ("messages", "conversations")  # CSV cells that hold a JSON list


@dataclass
class Record:
    """One checked row of a data file, before conversion."""

    where: str  # "file:line" or "file: row N", for messages
    line: int  # line (JSONL, CSV) or 1-based row number (Parquet, Arrow)
    row: dict[str, Any]
    fmt: RowFormat


def split_paths(spec: str | Path) -> list[Path]:
    """'a.jsonl,b.jsonl' -> two paths; a path that exists as given is never split."""
    text = str(spec)
    if Path(text).expanduser().exists() or "," not in text:
        return [Path(text).expanduser()]
    paths = [Path(part.strip()).expanduser() for part in text.split(",") if part.strip()]
    if not paths:
        raise SlimtuneError(f"--data {text!r}: give a file, or files separated by commas")
    return paths


def read_source(spec: str | Path) -> list[Record]:
    """Checked records of one or several files (concatenated in the order given)."""
    return [record for path in split_paths(spec) for record in read_file(path)]


def read_file(path: Path) -> list[Record]:
    """Checked records of one file; its format is set by its first row."""
    if not path.exists():
        raise SlimtuneError(f"data file {path} does not exist")
    records: list[Record] = []
    fmt = None
    for where, line, row in raw_rows(path):
        fmt = fmt or detect_format(row, where)
        check_row(row, fmt, where)
        records.append(Record(where, line, row, fmt))
    if not records:
        raise SlimtuneError(f"{path} is empty: give one row per line, {ACCEPTED}")
    return records


def raw_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(where, line or row number, row) of any supported file, unchecked."""
    if path.is_dir():
        yield from arrow_dir_rows(path)
    elif path.suffix == ".csv":
        yield from csv_rows(path)
    elif path.suffix in (".parquet", ".arrow"):
        yield from table_rows(path, read_table(path))
    else:
        yield from jsonl_rows(path)


def jsonl_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = decode_utf8(raw, path, number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SlimtuneError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            except (ValueError, RecursionError) as exc:  # 5000-digit numbers, [[[[…]]]]
                raise SlimtuneError(f"{path}:{number}: not valid JSON ({exc})") from None
            yield f"{path}:{number}", number, row


def csv_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    """Rows of a CSV file with a header line; empty cells count as absent."""
    reader = csv.DictReader(io.StringIO(decode_utf8(path.read_bytes(), path), newline=""))
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise SlimtuneError(f"{where}: more cells than the header has columns")
            cells = {k: v for k, v in row.items() if v not in ("", None)}
            for key in JSON_CELLS:
                if key in cells:
                    try:
                        cells[key] = json.loads(cells[key])
                    except (ValueError, RecursionError) as exc:
                        raise SlimtuneError(
                            f"{where}: column {key!r} must hold a JSON list ({exc})"
                        ) from None
            yield where, reader.line_num, cells
    except csv.Error as exc:  # a NUL byte, a field past csv's size limit, …
        raise SlimtuneError(f"{path}:{reader.line_num}: not readable CSV ({exc})") from None


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise SlimtuneError(
            "reading Parquet or Arrow data needs pyarrow: pip install 'slimtune[data]'"
        ) from None
    return pyarrow


def read_table(path: Path):
    """A pyarrow Table from a .parquet file or an Arrow stream/file (.arrow)."""
    pa = _pyarrow()
    try:
        if path.suffix == ".parquet":
            table = pa.parquet.read_table(path)
        else:
            with pa.memory_map(str(path)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(source).read_all()
        table.validate(full=True)  # UTF-8 of every string, offsets inside their buffers
        return table
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # bytes of its schema too
        raise SlimtuneError(f"{path}: not a readable {path.suffix[1:]} file ({exc})") from None


def table_rows(path: Path, table, offset: int = 0) -> Iterator[tuple[str, int, Any]]:
    """Rows of a table as dicts; null cells count as absent."""
    for i, row in enumerate(table.to_pylist(), start=offset + 1):
        yield f"{path}: row {i}", i, {k: v for k, v in row.items() if v is not None}


def arrow_dir_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    """A `datasets.save_to_disk` directory: state.json lists its Arrow files (a DatasetDict:
    its `train` split)."""
    if (path / "dataset_dict.json").is_file():
        splits = _json(path / "dataset_dict.json").get("splits", [])
        if "train" not in splits:
            raise SlimtuneError(f"{path}: a DatasetDict without a 'train' split (has {splits})")
        path = path / "train"
    if not (path / "state.json").is_file():
        raise SlimtuneError(
            f"{path} is a directory but not one written by datasets' save_to_disk "
            "(no state.json); give a .jsonl, .csv, .parquet or .txt file"
        )
    files = [entry["filename"] for entry in _json(path / "state.json").get("_data_files", [])]
    offset = 0
    for name in files:
        table = read_table(path / Path(name).name)
        yield from table_rows(path, table, offset)
        offset += table.num_rows


def _json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlimtuneError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(loaded, dict):
        raise SlimtuneError(f"{path}: expected a JSON object")
    return loaded
