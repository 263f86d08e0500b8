"""Merging a QLoRA adapter without quality loss: into the weights it was trained against."""

from __future__ import annotations

import json

import pytest
import torch

import slimtune as st
from slimtune.cli.merge import merged_model
from slimtune.errors import SlimtuneError
from slimtune.quant.linear import METADATA_KEY, quant_metadata, trained_base
from tiny_models import trained_qlora


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_merge_into_trained_base_keeps_the_qlora_outputs(tiny_llama_dir, tmp_path, quant):
    model = trained_qlora(tiny_llama_dir, quant)
    ids = torch.randint(0, 90, (2, 20))
    with torch.no_grad():
        trained = model(ids).logits
    metadata = quant_metadata(model)
    assert json.loads(metadata[METADATA_KEY])["quant"] == quant
    st.save_adapter(model, tmp_path / "adapter", metadata=metadata)
    merged, _ = merged_model(str(tiny_llama_dir), tmp_path / "adapter")
    original, _ = merged_model(str(tiny_llama_dir), tmp_path / "adapter", into="original")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        gap = (merged(ids).logits - trained).abs().max()
        moved = (original(ids).logits - trained).abs().max()
    assert gap <= 1e-4
    assert moved > 100 * max(gap, 1e-7)  # merging into the original weights changes answers


def test_bf16_trained_base_is_requantized_from_bf16(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    st.quantize_model(model, "nf4")
    expected = model.model.layers[1].mlp.down_proj.dequantize_weight(torch.float32)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    base = trained_base(fresh, quant_metadata(model))
    assert torch.equal(base.model.layers[1].mlp.down_proj.weight, expected)
    assert (
        type(base.lm_head) is torch.nn.Linear
        and type(base.model.layers[0].mlp.up_proj) is torch.nn.Linear
    )


def test_peft_loads_an_adapter_with_quantization_metadata(tiny_llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = trained_qlora(tiny_llama_dir, "nf4")
    st.save_adapter(model, tmp_path / "adapter", metadata=quant_metadata(model))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    b = loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.equal(b, model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)


def test_unreadable_metadata_is_one_line_error(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(SlimtuneError, match=METADATA_KEY):
        trained_base(model, {METADATA_KEY: '{"quant": "nf5"}'})
    assert trained_base(model, {}) is model


def test_cli_merge_into_original_prints_the_shift(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from slimtune.cli.main import main

    model = trained_qlora(tiny_llama_dir, "nf4")
    st.save_adapter(model, tmp_path / "adapter", metadata=quant_metadata(model))
    args = ["merge", "--model", str(tiny_llama_dir), "--adapter", str(tmp_path / "adapter")]
    assert main([*args, "--out", str(tmp_path / "trained")]) == 0
    assert "moved" not in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "original"), "--into", "original"]) == 0
    assert "outputs moved from the trained QLoRA model: max |Δlogit|" in capsys.readouterr().out
    ids = torch.randint(0, 90, (1, 12))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "trained", dtype=torch.float32)
    with torch.no_grad():
        assert (merged(ids).logits - model(ids).logits).abs().max() <= 1e-4
