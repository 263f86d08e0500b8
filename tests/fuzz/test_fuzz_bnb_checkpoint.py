"""Fuzzed bitsandbytes 4-bit checkpoints: a damaged model.safetensors, or a quant_state JSON
whose fields have the wrong types, either loads (with the stored codes unchanged) or fails
with one SlimtuneError line naming the file or the tensor key at fault."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from fuzz_bytes import damaged, examples, json_values, near_header
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from slimtune.errors import SlimtuneError
from slimtune.file_checks import load_safetensors
from slimtune.quant.bnb_checkpoint import bnb_4bit_state_dict, load_bnb_4bit
from slimtune.quant.linear import quantize_model
from tiny_models import tiny_llama

PACKED = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"


def skeleton():
    return tiny_llama(hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    model = skeleton()
    quantize_model(model, "nf4", skip=["lm_head"], blocksize=64, double_quant=True)
    state = {k: v.contiguous() for k, v in bnb_4bit_state_dict(model).items()}
    path = tmp_path_factory.mktemp("bnb") / "model.safetensors"
    save_file(state, str(path))
    return path


def loads_or_names(path) -> None:
    try:
        tensors, _ = load_safetensors(path)
        load_bnb_4bit(skeleton(), tensors)
    except SlimtuneError as exc:
        message = str(exc)
        assert "\n" not in message
        assert str(path) in message or ".weight" in message or "checkpoint" in message, message


def test_the_good_checkpoint_loads_its_codes(good):
    tensors, _ = load_safetensors(good)
    model = load_bnb_4bit(skeleton(), tensors)
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(
        layer.quant_state.codes, tensors["model.layers.0.self_attn.q_proj.weight"].reshape(-1)
    )


@examples(60)
@given(data=st.data())
def test_damaged_bnb_file(good, data, tmp_path):
    blob = good.read_bytes()
    bad = data.draw(damaged(blob) | near_header(blob, 8 + struct.unpack("<Q", blob[:8])[0]))
    path = tmp_path / "model.safetensors"
    path.write_bytes(bad)
    loads_or_names(path)


@examples(50)
@given(data=st.data(), value=json_values())
def test_wrong_types_in_quant_state(good, data, value, tmp_path):
    tensors, _ = load_safetensors(good)
    meta = json.loads(bytes(tensors[PACKED].tolist()))
    key = data.draw(st.sampled_from(sorted(meta)))
    meta[key] = value
    tensors[PACKED] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    loads_or_names(path)


@examples(40)
@given(data=st.data())
def test_tensors_of_the_wrong_shape_or_dtype(good, data, tmp_path):
    tensors, _ = load_safetensors(good)
    key = data.draw(st.sampled_from(sorted(k for k in tensors if ".weight" in k)))
    n = data.draw(st.integers(0, 300))
    dtype = data.draw(st.sampled_from([torch.uint8, torch.float32, torch.float16, torch.int64]))
    tensors[key] = torch.zeros(n, dtype=dtype)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    loads_or_names(path)
