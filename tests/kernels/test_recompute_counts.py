"""Activation recomputation proven by counting: a recomputed decoder layer runs its forward
twice per step (once without a graph, once again in backward), a kept one once; and the
forward keeps fewer tensors for backward. Counted with forward hooks and PyTorch's
saved-tensor hooks, not with slimtune's own bookkeeping."""

from __future__ import annotations

import json

import pytest
import torch

from slimtune.kernels.recompute import enable_checkpointing


def counted(model) -> list[int]:
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def saved_bytes(model, ids) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return total


@pytest.mark.parametrize(("fraction", "twice"), [(1.0, [2, 2]), (0.5, [2, 1]), (0.0, [1, 1])])
def test_recomputed_layers_run_twice(tiny_llama, fraction, twice):
    model, _ = tiny_llama
    model.train()
    ids = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = saved_bytes(model, ids)
    assert enable_checkpointing(model, fraction=fraction) == twice.count(2)
    calls = counted(model)
    kept = saved_bytes(model, ids)
    assert calls == twice
    assert (kept < plain) == (2 in twice)


def test_the_training_loop_recomputes_when_asked(tiny_llama, tmp_path):
    import slimtune as st

    model, tokenizer = tiny_llama
    model = st.add_adapter(model, st.LoraConfig(r=2, target_modules=["q_proj"]))
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i} " * 3}) + "\n" for i in range(4)))
    calls = counted(model)
    config = st.TrainConfig(max_steps=2, batch_size=2, save_every=0, checkpointing="all")
    st.train(model, tokenizer, path, config, tmp_path / "run", quiet=True)
    assert calls == [2 * 2, 2 * 2]  # 2 steps, each layer's forward twice
