"""Fuzzed adapter directories: a damaged adapter_config.json or adapter_model.safetensors,
or a config whose fields have the wrong types, either loads or fails with one SlimtuneError
line naming the file (or the key at fault)."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from fuzz_bytes import damaged, examples, json_values, near_header
from hypothesis import given
from hypothesis import strategies as st

import slimtune as st_
from slimtune.errors import SlimtuneError
from tiny_models import tiny_llama

CONFIGS = {
    "lora": st_.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "ia3": st_.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prompt": st_.PromptTuningConfig(num_virtual_tokens=3),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "adapter"
    st_.save_adapter(st_.add_adapter(tiny_llama(), CONFIGS[request.param]), path)
    return path


def loads_or_names(directory, *names: str) -> None:
    try:
        st_.load_adapter(tiny_llama(), directory)
    except SlimtuneError as exc:
        message = str(exc)
        assert "\n" not in message
        assert str(directory) in message or any(n in message for n in names), message


def copy_with(saved, tmp_path, name: str, content: bytes):
    target = tmp_path / "adapter"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(saved, target)
    (target / name).write_bytes(content)
    return target


@examples(40)
@given(data=st.data())
def test_damaged_weights(saved, data, tmp_path):
    good = (saved / "adapter_model.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", good[:8])[0]
    bad = data.draw(damaged(good) | near_header(good, header_end))
    loads_or_names(copy_with(saved, tmp_path, "adapter_model.safetensors", bad))


@examples(40)
@given(data=st.data())
def test_damaged_config(saved, data, tmp_path):
    bad = data.draw(damaged((saved / "adapter_config.json").read_bytes()))
    loads_or_names(copy_with(saved, tmp_path, "adapter_config.json", bad))


@examples(60)
@given(data=st.data(), value=json_values())
def test_wrong_types_in_config(saved, data, value, tmp_path):
    config = json.loads((saved / "adapter_config.json").read_text())
    key = data.draw(st.sampled_from(sorted(config)))
    config[key] = value
    directory = copy_with(saved, tmp_path, "adapter_config.json", json.dumps(config).encode())
    loads_or_names(directory, key)


@examples(30)
@given(size=st.sampled_from([2**64 - 1, 2**63, 2**40, 10**9]))
def test_huge_declared_header_allocates_nothing(saved, size, tmp_path):
    good = (saved / "adapter_model.safetensors").read_bytes()
    bad = struct.pack("<Q", size) + good[8:]
    with pytest.raises(SlimtuneError, match="truncated"):
        st_.load_adapter(tiny_llama(), copy_with(saved, tmp_path, "adapter_model.safetensors", bad))
