"""A chat template trained with --chat-template replaces a source GGUF's in the exported GGUF;
without one the source's tokenizer fields are copied verbatim (read back with gguf-py)."""

import pytest

from slimtune.export.gguf_vocab import copy_tokenizer_fields

gguf = pytest.importorskip("gguf")


def write(path, fields: dict) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in fields.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.STRING)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tokenizer_fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.mark.parametrize("source_template", ["{{ 'source' }}", None])
@pytest.mark.parametrize("ours", ["{{ 'ours' }}", None])
def test_chat_template_replaces_the_source_one(tmp_path, source_template, ours):
    fields = {"tokenizer.ggml.model": "gpt2"}
    if source_template:
        fields["tokenizer.chat_template"] = source_template
    write(tmp_path / "source.gguf", fields)
    writer = gguf.GGUFWriter(tmp_path / "out.gguf", "llama")
    copy_tokenizer_fields(writer, tmp_path / "source.gguf", ours)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expected = dict(fields)
    if ours:
        expected["tokenizer.chat_template"] = ours
    assert tokenizer_fields(tmp_path / "out.gguf") == expected
