"""IA³ against PEFT: files both ways with identical logits, merge, and the formula."""

import copy

import pytest
import torch
from peft import IA3Config as PeftIA3Config
from peft import PeftModel, get_peft_model

import slimtune as st
from slimtune.config import IA3Config
from slimtune.errors import SlimtuneError
from slimtune.methods.ia3 import IA3Linear, merge_ia3
from tiny_models import tiny_gpt2, tiny_llama


def tiny(kind: str = "llama"):
    return tiny_gpt2(n_positions=32) if kind == "gpt2" else tiny_llama()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb(model, seed):
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "ia3_l" in name:
            param.data.add_(torch.randn_like(param) * 0.2)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_ia3_file_loads_with_identical_logits(tmp_path, kind):
    peft_model = get_peft_model(tiny(kind), PeftIA3Config(task_type="CAUSAL_LM")).eval()
    perturb(peft_model, 1)
    peft_model.save_pretrained(tmp_path)
    ours = st.load_adapter(tiny(kind), tmp_path)
    assert sum(isinstance(m, IA3Linear) for m in ours.modules()) == (6 if kind == "llama" else 4)
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(logits(ours, ids), logits(peft_model, ids), rtol=0, atol=0)


def test_slimtune_ia3_file_loads_in_peft_with_identical_logits(tmp_path):
    ours = st.add_adapter(tiny(), IA3Config())
    perturb(ours, 2)
    st.save_adapter(ours, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(tiny(), tmp_path / "a").eval()
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(logits(ours, ids), logits(peft_model, ids), rtol=0, atol=0)


def test_fresh_ia3_is_the_base_model_and_trains_only_vectors():
    base = tiny()
    model = st.add_adapter(copy.deepcopy(base), IA3Config())
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=0)
    # k_proj, v_proj: 16 outputs each (2 kv heads x 8); down_proj: 64 inputs; 2 layers
    assert st.trainable_parameters(model)[0] == 2 * (16 + 16 + 64)


def test_merge_equals_peft_merge(tmp_path):
    peft_model = get_peft_model(tiny(), PeftIA3Config(task_type="CAUSAL_LM")).eval()
    perturb(peft_model, 3)
    peft_model.save_pretrained(tmp_path)
    ours = st.load_adapter(tiny(), tmp_path)
    st.merge(ours)
    merged = peft_model.merge_and_unload()
    for name in ("self_attn.k_proj", "mlp.down_proj"):
        ours_w = ours.model.layers[0].get_submodule(name).base_layer.weight
        torch.testing.assert_close(ours_w, merged.model.layers[0].get_submodule(name).weight)


def test_merge_is_the_formula():
    w, l_out = torch.randn(4, 3), torch.rand(4)
    torch.testing.assert_close(merge_ia3(w, l_out, feedforward=False), w * l_out[:, None])
    l_in = torch.rand(3)
    torch.testing.assert_close(merge_ia3(w, l_in, feedforward=True), w * l_in[None, :])


def test_bad_input():
    with pytest.raises(SlimtuneError, match="feedforward_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(SlimtuneError, match="matches no module"):
        st.add_adapter(tiny(), IA3Config(target_modules=["nope"], feedforward_modules=[]))
