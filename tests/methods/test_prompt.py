"""Prompt tuning against PEFT (files both ways, identical logits) and a hand-written greedy loop."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft import PromptTuningConfig as PeftPromptTuningConfig
from safetensors.torch import load_file, save_file

import tiny_models
from slimtune.config import PromptTuningConfig
from slimtune.errors import SlimtuneError
from slimtune.methods.prompt import (
    add_prompt_tuning,
    load_prompt_tuning,
    peft_config_dict,
    prompt_state_dict,
    text_token_ids,
)


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    return tiny_models.tiny_llama(seed, pad_token_id=0, eos_token_id=2)


def test_peft_soft_prompt_loads_with_identical_logits(tmp_path):
    peft_model = get_peft_model(
        tiny_llama(), PeftPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    ).eval()
    peft_model.save_pretrained(tmp_path)
    ids = torch.randint(3, 64, (2, 7))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits[:, 5:]  # (B, T, V), PEFT keeps the prompt rows
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    state = load_file(tmp_path / "adapter_model.safetensors")
    ours = load_prompt_tuning(tiny_llama(), config, state).eval()
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_slimtune_soft_prompt_loads_in_peft_with_identical_logits(tmp_path):
    ours = add_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=4))
    with torch.no_grad():
        ours.prompt_embeddings.normal_()
    (tmp_path / "adapter_config.json").write_text(json.dumps(peft_config_dict(ours)))
    save_file(prompt_state_dict(ours), tmp_path / "adapter_model.safetensors")
    ids = torch.randint(3, 64, (2, 6))
    labels = ids.clone()
    with torch.no_grad():
        got = ours(input_ids=ids, labels=labels)
        peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        expected = peft_model(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits[:, 4:], rtol=0, atol=0)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)


def test_only_the_prompt_trains_and_gets_gradients():
    model = add_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_embeddings"]
    ids = torch.randint(3, 64, (2, 5))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.prompt_embeddings.grad.abs().sum() > 0


def test_text_init_copies_the_texts_embeddings():
    base = tiny_llama()
    table = base.get_input_embeddings().weight.detach().clone()

    class Tok:
        def __call__(self, text):
            return {"input_ids": [5, 9, 11]}

    config = PromptTuningConfig(
        num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text="Answer:"
    )
    model = add_prompt_tuning(base, config, tokenizer=Tok())
    assert text_token_ids([5, 9, 11], 5) == [5, 9, 11, 5, 9]
    torch.testing.assert_close(model.prompt_embeddings.data, table[[5, 9, 11, 5, 9]])


def test_generate_with_cache_matches_a_greedy_loop_without_cache():
    model = add_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3))
    with torch.no_grad():
        model.prompt_embeddings.normal_()
    ids = torch.randint(3, 64, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding on the first row
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    # reference: recompute the whole sequence each step, positions counted over the mask
    base, prompt = model.base_model, model.prompt_embeddings.detach()
    cur, cur_mask = ids.clone(), mask.clone()
    for _ in range(4):
        embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(cur)], 1)
        full_mask = torch.cat([torch.ones(2, 3, dtype=mask.dtype), cur_mask], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = base(
                inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions
            ).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        cur, cur_mask = torch.cat([cur, nxt], 1), torch.cat([cur_mask, torch.ones_like(nxt)], 1)
    assert torch.equal(got, cur)


def test_bad_input():
    with pytest.raises(SlimtuneError, match="num_virtual_tokens"):
        PromptTuningConfig(num_virtual_tokens=0)
    config = {"num_virtual_tokens": 2, "token_dim": 48}
    with pytest.raises(SlimtuneError, match="token_dim=48.*hidden size 32"):
        load_prompt_tuning(tiny_llama(), config, {"prompt_embeddings": torch.zeros(2, 48)})


def test_save_and_load_through_the_public_api(tmp_path):
    import slimtune as st

    model = st.add_adapter(tiny_llama(), PromptTuningConfig(num_virtual_tokens=4))
    with torch.no_grad():
        model.prompt_embeddings.normal_()
    st.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["token_dim"] == 32
    loaded = st.load_adapter(tiny_llama(), tmp_path / "a").eval()
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    ids = torch.randint(3, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits[:, 4:], rtol=0, atol=0
        )
    assert st.trainable_parameters(loaded)[0] == 4 * 32


def test_a_soft_prompt_is_never_merged_silently():
    import slimtune as st

    model = st.add_adapter(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(SlimtuneError, match="PromptTuningModel cannot be merged"):
        st.merge_and_unload(model)
