"""The Chat tab's models and streams: the same model the CLI loads for `generate`, and the
same text `generate` writes, arriving in pieces."""

from __future__ import annotations

import shutil

import torch

import slimtune as st
from slimtune.cli.eval import load_for_inference
from slimtune.evaluate import generate
from slimtune.ui.chat import ModelCache, load_for_chat, stream_side_by_side


def trained_adapter(tiny_llama_dir, path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = st.add_adapter(model, st.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a non-zero B, so the adapter changes the answer
    st.save_adapter(model, path)
    return path


def test_chat_loads_what_the_cli_loads(tiny_llama_dir, tmp_path):
    adapter = trained_adapter(tiny_llama_dir, tmp_path / "adapter")
    ids = torch.tensor([[5, 9, 23, 40]])
    ours, _ = load_for_chat(str(tiny_llama_dir), adapter)
    cli, _ = load_for_inference(str(tiny_llama_dir), str(adapter))
    base, _ = load_for_chat(str(tiny_llama_dir), None)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, cli(ids).logits)
        assert not torch.allclose(ours(ids).logits, base(ids).logits)


def test_side_by_side_streams_the_texts_generate_writes(tiny_llama_dir, tmp_path):
    adapter = trained_adapter(tiny_llama_dir, tmp_path / "adapter")
    cache = ModelCache()
    pairs = [cache.get(str(tiny_llama_dir), None), cache.get(str(tiny_llama_dir), adapter)]
    assert cache.get(str(tiny_llama_dir), None) is pairs[0]  # cached, not loaded again
    seen = list(stream_side_by_side(pairs, "hello there", 0.0, 40))
    references = [generate(m, t, "hello there", max_new_tokens=40) for m, t in pairs]
    assert seen[-1] == references
    assert len({tuple(texts) for texts in seen}) > 2  # the texts grew piece by piece


def test_the_cache_keeps_only_the_latest_models(tiny_llama_dir, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, other)
    cache = ModelCache(size=1)
    first = cache.get(str(tiny_llama_dir), None)
    cache.get(str(other), None)
    assert list(cache.loaded) == [(str(other), None)]
    assert cache.get(str(tiny_llama_dir), None) is not first
