"""`slimtune merge` and `slimtune inspect` end to end, against PEFT's merge_and_unload."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from slimtune.cli.main import main

CONFIG = dict(
    target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8, init_lora_weights=False
)


@pytest.fixture
def peft_adapter(tiny_llama_dir, tmp_path) -> tuple[Path, torch.nn.Module]:
    """A PEFT-written adapter on the tiny Llama, and PEFT's own merged model."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CONFIG))
        model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model.merge_and_unload().eval()


def test_merge_of_a_peft_adapter_equals_peft_merge_and_unload(
    tiny_llama_dir, peft_adapter, tmp_path
):
    adapter, reference = peft_adapter
    out = tmp_path / "merged"
    assert (
        main(
            ["merge", "--model", str(tiny_llama_dir), "--adapter", str(adapter), "--out", str(out)]
        )
        == 0
    )
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(3, 60, (2, 11))
    with torch.no_grad():
        diff = (merged(x).logits - reference(x).logits).abs().max()
    assert diff <= 1e-5
    assert not any("lora" in k for k in merged.state_dict())


def test_inspect_reports_method_ranks_count_and_size(peft_adapter, capsys):
    adapter, _ = peft_adapter
    assert main(["inspect", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert "LORA (r=4, lora_alpha=8, scaling 2)" in text
    layers = len({k.split(".")[4] for k in load_file(adapter / "adapter_model.safetensors")})
    assert f"model.layers.*.self_attn.q_proj  ×{layers}  rank 4  lora_A (4, 32)" in text
    # PEFT's count of what trains: per layer q (32->32), v (32->16), down (64->32) at rank 4
    expected = 2 * 4 * ((32 + 32) + (32 + 16) + (64 + 32))
    assert f"trainable    {expected:,} parameters" in text
    assert "file size" in text and "adapter_model.safetensors" in text


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_merge_bad_inputs_get_one_line_errors(
    tiny_llama_dir, make_tiny_llama_dir, peft_adapter, tmp_path, capsys
):
    adapter, _ = peft_adapter
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    base = ["merge", "--model", str(tiny_llama_dir), "--adapter", str(adapter), "--out"]
    assert "not empty" in _error([*base, str(busy)], capsys)
    assert (busy / "keep.txt").read_text() == "mine"
    missing = tmp_path / "no-such-model"
    err = _error(
        ["merge", "--model", str(missing), "--adapter", str(adapter), "--out", str(tmp_path / "o")],
        capsys,
    )
    assert str(missing) in err
    wider = make_tiny_llama_dir(tmp_path / "wide", hidden_size=48)
    capsys.readouterr()
    err = _error(
        ["merge", "--model", str(wider), "--adapter", str(adapter), "--out", str(tmp_path / "o")],
        capsys,
    )
    assert "does not fit" in err and "model.layers.0." in err and "32" in err and "48" in err
    assert not (tmp_path / "o").exists()


def test_inspect_bad_inputs(tmp_path, capsys):
    assert "does not exist" in _error(["inspect", str(tmp_path / "nothing")], capsys)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickled")
    assert "pickled" in _error(["inspect", str(tmp_path)], capsys)
