"""Model argument resolution (slimtune.models): what is accepted and what is refused, in one line."""

from __future__ import annotations

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.models import load_model, model_directory, resolve_model_path


def test_a_transformers_directory_loads(tiny_llama_dir):
    model, tokenizer = load_model(tiny_llama_dir)
    assert not model.training and tokenizer.pad_token is not None
    assert next(model.parameters()).dtype == torch.float32
    assert model_directory(tiny_llama_dir) == tiny_llama_dir


def test_missing_path_is_named(tmp_path):
    with pytest.raises(SlimtuneError, match=r"does not exist.*smollm2-135m") as info:
        resolve_model_path(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SlimtuneError, match="no config.json"):
        resolve_model_path(tmp_path)


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(SlimtuneError, match=r"pickled.*safetensors") as info:
        resolve_model_path(tmp_path)
    assert "\n" not in str(info.value)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SlimtuneError, match="no .safetensors"):
        resolve_model_path(tmp_path)


def test_files_other_than_gguf_are_refused(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(SlimtuneError, match="pickled"):
        resolve_model_path(tmp_path / "w.pt")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(SlimtuneError, match="not a .gguf"):
        resolve_model_path(tmp_path / "w.txt")


def test_unloadable_directory_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SlimtuneError, match="cannot load"):
        load_model(tmp_path)
