"""loraplus.py: the parameter groups equal PEFT's create_loraplus_optimizer; in the trainer,
B moves at ratio × lr."""

import pytest
import torch
from test_data import write_jsonl

import slimtune as st
from slimtune.config import TrainConfig
from slimtune.errors import SlimtuneError
from slimtune.training.loop import train
from slimtune.training.loraplus import loraplus_param_groups

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def peft_name(name: str) -> str:
    """PEFT keeps DoRA's magnitude in a module (….default.weight); slimtune as a parameter."""
    return name.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")


def group_names(model, groups, prefix=""):
    names = {id(p): peft_name(n.removeprefix(prefix)) for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in groups]


@pytest.mark.parametrize("dora", [False, True])
def test_groups_equal_peft_create_loraplus_optimizer(tiny_llama_dir, dora):
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer
    from transformers import AutoModelForCausalLM

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)

    targets = TARGETS if not dora else ["q_proj", "v_proj"]  # PEFT's DoRA has no embeddings
    reference = peft.get_peft_model(
        base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora)
    )
    expected = create_loraplus_optimizer(
        reference, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.01
    )
    ours = st.add_adapter(
        base(), st.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora)
    )
    groups = loraplus_param_groups(ours, lr=1e-3, ratio=16, weight_decay=0.01)
    want = group_names(reference, expected.param_groups, "base_model.model.")
    assert group_names(ours, groups) == want
    assert all(names for names, _, _ in want[:1] + want[2:3])  # A and B groups are not empty
    assert [g["lr_scale"] for g in groups] == pytest.approx([1.0, 1e-3, 16.0, 16.0])


def test_the_trainer_moves_b_at_ratio_times_lr(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    torch.manual_seed(0)
    model = st.add_adapter(model, st.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    name = next(n for n, _ in model.named_parameters() if "lora_B" in n)
    before = dict(model.named_parameters())[name].detach().clone()
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}] * 2)
    config = TrainConfig(max_steps=1, lr=1e-3, schedule="constant", lora_plus_ratio=8, save_every=0)
    train(model, tokenizer, data, config, tmp_path / "run", quiet=True)
    step = (dict(model.named_parameters())[name].detach() - before).abs().max()
    # Adam's first step moves each parameter with a gradient by lr·g/|g| = the group's lr
    assert float(step) == pytest.approx(8e-3, rel=1e-3)


def test_lora_plus_needs_lora(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(SlimtuneError, match="--lora-plus-ratio needs LoRA B matrices"):
        loraplus_param_groups(model.requires_grad_(True), lr=1e-3, ratio=16)
