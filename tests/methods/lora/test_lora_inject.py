"""Injection (slimtune.inject + lora_inject) against HF PEFT on tiny random transformers models.

For every architecture: an adapter trained-looking (random B) moves PEFT -> slimtune and
slimtune -> PEFT with identical logits (max abs diff <= 1e-5, fp32), unmerged and merged,
and the trainable parameter count equals PEFT's.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import transformers as tf

import slimtune as st
from slimtune.errors import SlimtuneError
from slimtune.methods.lora.layers import LoraEmbedding, LoraFusedLinear, LoraLinear
from tiny_models import tiny_gpt2

ATOL = 1e-5


def small_config(layers: int = 2) -> dict:
    """Config fields shared by the tiny Llama / Qwen2 / Phi-3 / BERT models (MLP 48)."""
    return dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
    )


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    small = small_config()
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**small, num_key_value_heads=2))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**small, num_key_value_heads=2))
    elif arch == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**small, num_key_value_heads=4, pad_token_id=0))
    elif arch == "gpt2":
        model = tiny_gpt2(n_positions=32)
    else:
        config = tf.BertConfig(**small, num_labels=3)
        model = tf.BertForSequenceClassification(config)
    return model.eval()


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


CASES = {
    "llama": dict(
        target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, lora_alpha=8, use_rslora=True,
        rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
    ),
    "qwen2": dict(target_modules="all-linear", r=3, lora_alpha=6),
    "phi3": dict(target_modules=["qkv_proj", "gate_up_proj", "o_proj"], r=4, lora_alpha=4),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "wte"], r=2, lora_alpha=4, fan_in_fan_out=True),
    "bert": dict(target_modules=["query", "value"], r=4, lora_alpha=8, task_type="SEQ_CLS", modules_to_save=["classifier"]),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("arch", list(CASES))
def test_adapter_moves_both_ways_with_identical_logits(arch, tmp_path):
    base = tiny(arch)
    x = torch.randint(1, 64, (2, 9))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **CASES[arch])
    )
    theirs.eval()
    if arch == "bert":  # make the trained copy of the classifier differ from the original
        torch.nn.init.normal_(theirs.base_model.model.classifier.modules_to_save["default"].weight)
    reference = logits(theirs, x)
    assert (reference - logits(base, x)).abs().max() > 1e-3  # the adapter does something
    theirs.save_pretrained(tmp_path / "peft")

    ours = st.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert (logits(ours, x) - reference).abs().max() <= ATOL
    assert st.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()

    st.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert (logits(back, x) - reference).abs().max() <= ATOL

    st.merge(ours)
    assert (logits(ours, x) - reference).abs().max() <= ATOL
    st.unmerge(ours)
    plain = st.merge_and_unload(ours)
    assert (logits(plain, x) - reference).abs().max() <= ATOL
    if arch != "gpt2":  # PEFT merges GPT-2's tied wte into lm_head as well; slimtune unties them
        peft_plain = theirs.merge_and_unload()
        assert (logits(plain, x) - logits(peft_plain, x)).abs().max() <= ATOL
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())


def test_trainable_parameters_equal_peft_for_a_fresh_config():
    base = tiny("llama")
    config = dict(target_modules="all-linear", r=8, lora_alpha=16, bias="lora_only")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = st.add_adapter(copy.deepcopy(base), st.LoraConfig(**config))
    assert st.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    ours_names = {n.replace(".default", "") for n, p in ours.named_parameters() if p.requires_grad}
    theirs_names = {
        n.replace(".default", "")
        for n, p in theirs.base_model.model.named_parameters()
        if p.requires_grad
    }
    assert ours_names == theirs_names
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
        dict(target_modules=r".*\.(k_proj|up_proj)", exclude_modules=["layers.0.mlp.up_proj"]),
        dict(target_modules=["proj"]),
        dict(target_modules=None),
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0, layers_pattern="layers"),
        dict(target_modules="all-linear", exclude_modules=r".*mlp.*"),
    ],
)
def test_target_matching_selects_what_peft_selects(kwargs):
    base = tiny("llama")
    try:
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
        expected = {
            n.removeprefix("base_model.model.")
            for n, m in theirs.named_modules()
            if hasattr(m, "lora_A")
        }
    except ValueError:
        expected = set()
    try:
        ours = st.add_adapter(copy.deepcopy(base), st.LoraConfig(**kwargs))
        got = {n for n, m in ours.named_modules() if isinstance(m, LoraLinear)}
    except SlimtuneError:
        got = set()
    assert got == expected


def test_targets_matching_nothing_list_existing_names():
    with pytest.raises(SlimtuneError, match=r"q_proj, k_proj, v_proj"):
        st.add_adapter(tiny("llama"), st.LoraConfig(target_modules=["query_proj"]))
    with pytest.raises(SlimtuneError, match="LoRA adapts Linear"):
        st.add_adapter(tiny("llama"), st.LoraConfig(target_modules=["mlp"]))


def test_several_adapters_set_disable_delete_as_peft(tmp_path):
    base = tiny("llama")
    x = torch.randint(1, 64, (2, 9))
    cfg_a = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    cfg_b = dict(target_modules=["k_proj", "v_proj"], r=2, lora_alpha=2, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg_a), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(**cfg_b))
    theirs.eval()
    theirs.save_pretrained(tmp_path)  # writes tmp_path/a and tmp_path/b
    ours = st.load_adapter(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    ours = st.load_adapter(ours, tmp_path / "b", adapter_name="b").eval()
    assert st.active_adapter(ours) == "a" and set(st.adapter_configs(ours)) == {"a", "b"}
    assert (logits(ours, x) - logits(theirs, x)).abs().max() <= ATOL
    st.set_adapter(ours, "b")
    theirs.set_adapter("b")
    assert (logits(ours, x) - logits(theirs, x)).abs().max() <= ATOL
    assert st.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    with st.disable_adapter(ours):
        assert (logits(ours, x) - logits(base, x)).abs().max() <= ATOL
    assert (logits(ours, x) - logits(theirs, x)).abs().max() <= ATOL
    st.delete_adapter(ours, "b")
    theirs.delete_adapter("b")
    theirs.set_adapter("a")
    assert st.active_adapter(ours) == "a"
    assert (logits(ours, x) - logits(theirs, x)).abs().max() <= ATOL
    with pytest.raises(SlimtuneError, match="no adapter named 'b'"):
        st.set_adapter(ours, "b")


@pytest.mark.parametrize("combination", ["linear", "cat"])
def test_weighted_adapter_equals_peft(combination, tmp_path):
    base = tiny("llama")
    x = torch.randint(1, 64, (2, 9))
    r_b = 4 if combination == "linear" else 2
    cfg_a = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    cfg_b = dict(target_modules=["q_proj", "v_proj"], r=r_b, lora_alpha=3, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg_a), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(**cfg_b))
    theirs.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type=combination)
    theirs.set_adapter("mix")
    theirs.eval()
    ours = st.add_adapter(copy.deepcopy(base), st.LoraConfig(**cfg_a), "a")
    ours = st.add_adapter(ours, st.LoraConfig(**cfg_b), "b")
    ours.load_state_dict(
        {
            k.removeprefix("base_model.model."): v
            for k, v in theirs.state_dict().items()
            if ".mix" not in k
        }
    )
    st.add_weighted_adapter(ours, ["a", "b"], [0.7, -0.4], "mix")  # picks linear/cat from the ranks
    st.set_adapter(ours, "mix")
    assert (logits(ours.eval(), x) - logits(theirs, x)).abs().max() <= ATOL


def test_fused_layers_save_as_plain_peft_lora_and_come_back_fused(tmp_path):
    for arch, target in (("phi3", "qkv_proj"), ("gpt2", "c_attn")):
        base = tiny(arch)
        x = torch.randint(1, 64, (2, 9))
        config = st.LoraConfig(
            target_modules=[target], r=2, lora_alpha=6, init_lora_weights=False, use_rslora=arch == "gpt2",
            enable_lora={target: [True, False, True]},
        )  # fmt: skip
        ours = st.add_adapter(copy.deepcopy(base), config).eval()
        assert any(isinstance(m, LoraFusedLinear) for m in ours.modules())
        reference = logits(ours, x)
        st.save_adapter(ours, tmp_path / arch)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / arch).eval()
        assert (logits(theirs, x) - reference).abs().max() <= ATOL
        again = st.load_adapter(copy.deepcopy(base), tmp_path / arch).eval()
        assert sum(isinstance(m, LoraFusedLinear) for m in again.modules()) == 2
        assert (logits(again, x) - reference).abs().max() <= ATOL
        theirs.save_pretrained(tmp_path / f"{arch}-peft")  # PEFT's copy has no slimtune metadata
        plain = st.load_adapter(copy.deepcopy(base), tmp_path / f"{arch}-peft").eval()
        assert not any(isinstance(m, LoraFusedLinear) for m in plain.modules())
        assert (logits(plain, x) - reference).abs().max() <= ATOL


def test_pissa_adapter_saves_as_lora_on_the_original_weights(tmp_path):
    base = tiny("llama")
    x = torch.randint(1, 64, (2, 9))
    ours = st.add_adapter(
        copy.deepcopy(base),
        st.LoraConfig(
            target_modules=["q_proj", "o_proj"], r=2, lora_alpha=4, init_lora_weights="pissa"
        ),
    )
    assert (logits(ours, x) - logits(base, x)).abs().max() <= ATOL  # unchanged at step 0
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, LoraLinear):
                m.lora_B["default"].weight.add_(0.05 * torch.randn_like(m.lora_B["default"].weight))
    reference = logits(ours, x)
    st.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path
    ).eval()  # on the original W0
    assert (logits(theirs, x) - reference).abs().max() <= ATOL


def test_merge_twice_and_unmerge_unmerged_are_errors():
    model = st.add_adapter(
        tiny("llama"), st.LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
    )
    with pytest.raises(SlimtuneError, match="nothing is merged"):
        st.unmerge(model)
    st.merge(model)
    with pytest.raises(SlimtuneError, match="already merged"):
        st.merge(model)
    with pytest.raises(SlimtuneError, match="unmerge first"), st.disable_adapter(model):
        pass


def test_embedding_layer_kind():
    model = st.add_adapter(
        tiny("llama"), st.LoraConfig(target_modules=["embed_tokens"], init_lora_weights=False)
    )
    assert isinstance(model.model.embed_tokens, LoraEmbedding)
    assert "model.embed_tokens.lora_embedding_A.default" in model.state_dict()


def test_lora_on_a_quantized_base_trains_counts_and_merges_into_dequantized_weights():
    from slimtune.quant.linear import QuantLinear, quantize_model

    base = tiny("llama")
    x = torch.randint(1, 64, (2, 9))
    total = sum(p.numel() for p in base.parameters())
    model = quantize_model(copy.deepcopy(base), "nf4")
    quantized = logits(model, x)
    model = st.add_adapter(
        model,
        st.LoraConfig(target_modules="all-linear", r=2, lora_alpha=4, init_lora_weights=False),
    )
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, QuantLinear)
    trainable, counted = st.trainable_parameters(model)
    assert (
        counted == total + trainable
    )  # a 4-bit weight counts its in×out values, as PEFT counts it
    layer = model.model.layers[0].mlp.down_proj
    h = torch.randn(3, layer.in_features)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = h @ layer.base_layer.dequantize_weight(torch.float32).T + 2.0 * (h @ a.T) @ b.T
    torch.testing.assert_close(layer(h), expected, rtol=1e-5, atol=1e-5)
    adapted = logits(model, x)
    assert (adapted - quantized).abs().max() > 1e-3
    plain = st.merge_and_unload(model)
    assert isinstance(plain.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert (logits(plain, x) - adapted).abs().max() <= 1e-4


def test_fused_qkv_with_grouped_query_attention_slices_by_heads(tmp_path):
    torch.manual_seed(0)
    small = small_config(layers=1)
    base = tf.Phi3ForCausalLM(tf.Phi3Config(**small, num_key_value_heads=2, pad_token_id=0)).eval()
    config = st.LoraConfig(
        target_modules=["qkv_proj"],
        r=2,
        init_lora_weights=False,
        enable_lora={"qkv_proj": [True, False, True]},
    )
    ours = st.add_adapter(copy.deepcopy(base), config).eval()
    layer = ours.model.layers[0].self_attn.qkv_proj
    assert layer.sizes == [32, 16, 16]
    h = torch.randn(3, 32)
    assert torch.equal(layer(h)[:, 32:48], layer.base_layer(h)[:, 32:48])  # K slice unchanged
    x = torch.randint(1, 64, (2, 9))
    st.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert (logits(theirs, x) - logits(ours, x)).abs().max() <= ATOL
