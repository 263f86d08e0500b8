"""Fuzzed GGUF models: file_checks.check_gguf walks a damaged header with bounded reads, and
whatever it accepts the reference reader (the gguf package, llama.cpp's own Python reader)
reads with every tensor inside the file; a damaged model given to slimtune either loads or
fails with one SlimtuneError line naming the file."""

from __future__ import annotations

import struct

import pytest
from fuzz_bytes import damaged, examples, near_header
from hypothesis import given
from hypothesis import strategies as st

from export_helpers import build_bpe_tokenizer, build_model
from slimtune.errors import SlimtuneError
from slimtune.export.gguf import export_gguf
from slimtune.file_checks import check_gguf
from slimtune.models import model_directory


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    tokenizer = build_bpe_tokenizer()
    model = build_model("llama", len(tokenizer))
    path = export_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "m.gguf", dtype="f32",
                       say=lambda line: None)  # fmt: skip
    return path.read_bytes()


def test_good_file_passes_and_tensors_agree_with_the_reference(good, tmp_path):
    from gguf import GGUFReader

    path = tmp_path / "m.gguf"
    path.write_bytes(good)
    check_gguf(path)
    reader = GGUFReader(path)
    assert all(t.data_offset + t.n_bytes <= len(good) for t in reader.tensors)


@examples(150)
@given(data=st.data())
def test_whatever_check_gguf_accepts_the_reference_reads(good, data, tmp_path):
    from gguf import GGUFReader

    bad = data.draw(damaged(good) | near_header(good, 4096))
    path = tmp_path / "m.gguf"
    path.write_bytes(bad)
    try:
        check_gguf(path)
    except SlimtuneError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return
    reader = GGUFReader(path)  # the reference must read what the check let through
    assert all(t.data_offset + t.n_bytes <= len(bad) for t in reader.tensors)


@pytest.mark.parametrize("size", [2**64 - 1, 2**40, 10**9])
def test_huge_counts_allocate_nothing(good, size, tmp_path):
    path = tmp_path / "m.gguf"
    for at in (8, 16):  # tensor count, metadata key count
        path.write_bytes(good[:at] + struct.pack("<Q", size) + good[at + 8 :])
        with pytest.raises(SlimtuneError, match="truncated or damaged"):
            check_gguf(path)


@examples(8)
@given(data=st.data())
def test_damaged_model_loads_or_is_one_line(good, data, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    path.write_bytes(data.draw(damaged(good)))
    try:
        model_directory(path)
    except SlimtuneError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc), str(exc)
