"""DoRA against PEFT: files both ways with identical logits, and the merged weight."""

import copy

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import slimtune as st
from slimtune.config import LoraConfig
from slimtune.errors import SlimtuneError
from slimtune.methods.dora import DoraLinear, dora_weight
from tiny_models import tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def trained_peft_dora(path):
    """A PEFT DoRA model whose B and magnitude are non-trivial (as after training)."""
    config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    model = get_peft_model(tiny_llama(), config).eval()
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name or "magnitude" in name:
            param.data.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_peft_dora_file_loads_with_identical_logits(tmp_path):
    peft_model = trained_peft_dora(tmp_path)
    ids = torch.randint(0, 64, (2, 9))
    ours = st.load_adapter(tiny_llama(), tmp_path)
    assert sum(isinstance(m, DoraLinear) for m in ours.modules()) == 6
    torch.testing.assert_close(logits(ours, ids), logits(peft_model, ids))


def test_slimtune_dora_file_loads_in_peft_with_identical_logits(tmp_path):
    ours = st.add_adapter(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    )
    torch.manual_seed(2)
    for name, param in ours.named_parameters():
        if "lora_B" in name or "magnitude" in name:
            param.data.add_(torch.randn_like(param) * 0.1)
    st.save_adapter(ours, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(logits(ours, ids), logits(peft_model, ids))


def test_fresh_dora_is_the_base_model_and_magnitude_is_the_row_norm():
    base = tiny_llama()
    model = st.add_adapter(
        copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    )
    layer = model.model.layers[0].self_attn.q_proj
    w0 = base.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].data, w0.norm(dim=1))
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(logits(model, ids), logits(base, ids))


def test_merge_equals_peft_merge_and_unmerge_restores(tmp_path):
    peft_model = trained_peft_dora(tmp_path)
    ours = st.load_adapter(tiny_llama(), tmp_path)
    ids = torch.randint(0, 64, (2, 9))
    before = logits(ours, ids)
    st.merge(ours)
    peft_merged = copy.deepcopy(peft_model).merge_and_unload()
    for name in ("q_proj", "v_proj"):
        ours_w = getattr(ours.model.layers[1].self_attn, name).base_layer.weight
        peft_w = getattr(peft_merged.model.layers[1].self_attn, name).weight
        torch.testing.assert_close(ours_w, peft_w)
    torch.testing.assert_close(logits(ours, ids), before, rtol=1e-5, atol=1e-5)
    st.unmerge(ours)
    original = tiny_llama().model.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(ours.model.layers[1].self_attn.q_proj.base_layer.weight, original)


def test_dora_weight_is_the_formula():
    torch.manual_seed(0)
    w0, delta, m = torch.randn(5, 3), torch.randn(5, 3), torch.rand(5)
    w = w0 + delta
    expected = torch.stack([m[i] * w[i] / torch.sqrt((w[i] ** 2).sum()) for i in range(5)])
    torch.testing.assert_close(dora_weight(w0, delta, m), expected)


def test_gpt2_conv1d_matches_peft(tmp_path):
    base = tiny_gpt2(n_positions=32)
    config = PeftLoraConfig(r=2, target_modules=["c_proj"], use_dora=True, fan_in_fan_out=True)
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path)
    ours = st.load_adapter(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 64, (1, 6))
    torch.testing.assert_close(logits(ours, ids), logits(peft_model, ids))


def test_dora_refuses_embeddings():
    config = LoraConfig(r=2, target_modules=["embed_tokens"], use_dora=True)
    with pytest.raises(SlimtuneError, match="embed_tokens.*DoRA does not support LoraEmbedding"):
        st.add_adapter(tiny_llama(), config)


def test_gradients_match_peft(tmp_path):
    peft_model = trained_peft_dora(tmp_path)
    ours = st.load_adapter(tiny_llama(), tmp_path)
    ids = torch.randint(0, 64, (2, 9))
    for model in (peft_model, ours):
        model(input_ids=ids, labels=ids).loss.backward()
    peft_grads = {
        n.replace("base_model.model.", "").replace(".weight", ""): p.grad
        for n, p in peft_model.named_parameters()
        if p.requires_grad
    }
    ours_grads = {
        n.replace(".weight", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad
    }
    assert sorted(ours_grads) == sorted(peft_grads)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, peft_grads[name], msg=name)
