"""Fuzzed checkpoints: a damaged trainable/optimizer/rng.safetensors or state.json, or a
state.json whose fields have the wrong types, either loads or fails on --resume with one
SlimtuneError line naming the checkpoint (or the file or key at fault)."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from fuzz_bytes import damaged, examples, json_values, near_header
from hypothesis import given
from hypothesis import strategies as st

import slimtune as st_
from slimtune.errors import SlimtuneError
from slimtune.training import checkpoints
from slimtune.training.checkpoints_sharded import load_checkpoint
from tiny_models import tiny_llama

FILES = ["trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]


def model_and_optimizer():
    model = st_.add_adapter(tiny_llama(), st_.LoraConfig(r=2, target_modules=["q_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-3), params


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    model, optimizer, params = model_and_optimizer()
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    state = {"step": 1, "micro_batches": 1, "tokens": 10, "elapsed_s": 0.5}
    return checkpoints.save_checkpoint(run, model, optimizer, state)


def loads_or_names(path) -> None:
    model, optimizer, _ = model_and_optimizer()
    try:
        load_checkpoint(path, model, optimizer)
    except SlimtuneError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), str(exc)


def copy_with(saved, tmp_path, name: str, content: bytes):
    target = tmp_path / "checkpoints" / saved.name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(saved, target)
    (target / name).write_bytes(content)
    return target


def test_the_good_checkpoint_loads_exactly(saved):
    model, optimizer, _ = model_and_optimizer()
    state = load_checkpoint(saved, model, optimizer)
    assert state["step"] == 1 and len(optimizer.state) == 4
    stored = checkpoints.load_safetensors(saved / "trainable.safetensors")[0]
    assert all(torch.equal(p, stored[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("name", FILES)
@examples(30)
@given(data=st.data())
def test_damaged_checkpoint_file(saved, name, data, tmp_path):
    good = (saved / name).read_bytes()
    strategy = damaged(good)
    if name.endswith(".safetensors"):
        strategy = strategy | near_header(good, 8 + struct.unpack("<Q", good[:8])[0])
    loads_or_names(copy_with(saved, tmp_path, name, data.draw(strategy)))


@examples(50)
@given(data=st.data(), value=json_values())
def test_wrong_types_in_state_json(saved, data, value, tmp_path):
    state = json.loads((saved / "state.json").read_text())
    field = data.draw(st.sampled_from(sorted(state) + ["optimizer.param_groups.lr",
                                                       "optimizer.scalars"]))  # fmt: skip
    if field == "optimizer.param_groups.lr":
        state["optimizer"]["param_groups"][0]["lr"] = value
    elif field == "optimizer.scalars":
        state["optimizer"]["scalars"] = value
    else:
        state[field] = value
    loads_or_names(copy_with(saved, tmp_path, "state.json", json.dumps(state).encode()))
