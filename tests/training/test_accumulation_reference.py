"""Gradient accumulation against a hand-written token-weighted reference.

One optimizer step over four micro-batches of one row each, rows of very different label
counts (1 to 21 tokens): slimtune's gradient must be ∇(Σ token losses / Σ label tokens)
over all four rows, computed here with plain transformers logits and cross_entropy. A loop
that averaged each micro-batch on its own (∇ mean of per-row means) fails, as would one that
summed without dividing. (Several processes: tests/cli/test_distributed_cli.py shows that two
processes take the step one process takes, which this test pins to the reference.)
"""

from __future__ import annotations

import copy
import json

import torch
import torch.nn.functional as F

import slimtune as st
from slimtune.training.data import IGNORE_INDEX, load_dataset

ANSWERS = ["7", "abc", "a longer answer", "the longest answer of all four"]


def test_one_accumulated_step_has_the_token_weighted_gradient(tiny_llama, tmp_path, monkeypatch):
    model, tokenizer = tiny_llama
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}:", "completion": a}) + "\n"
                            for i, a in enumerate(ANSWERS)))  # fmt: skip
    data = load_dataset(path, tokenizer, 64)
    counts = [sum(x != IGNORE_INDEX for x in ex.labels) for ex in data.examples]
    assert len(set(counts)) == 4  # different weights per micro-batch
    lora = st.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = st.add_adapter(model, lora)
    reference = copy.deepcopy(model)

    captured: list[list[torch.Tensor]] = []
    clip = torch.nn.utils.clip_grad_norm_

    def capture(params, *args, **kwargs):
        params = list(params)
        captured.append([p.grad.detach().clone() for p in params])
        return clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture)
    config = st.TrainConfig(max_steps=1, batch_size=1, grad_accum=4, save_every=0, lr=1e-3)
    st.train(model, tokenizer, data, config, tmp_path / "run", quiet=True)

    total, n = torch.zeros(()), 0
    for example in data.examples:  # the reference: plain logits, one row at a time
        logits = reference(torch.tensor([example.input_ids])).logits[0, :-1]  # (T-1, V)
        target = torch.tensor(example.labels[1:])  # (T-1,)
        keep = target != IGNORE_INDEX
        total = total + F.cross_entropy(logits[keep], target[keep], reduction="sum")
        n += int(keep.sum())
    (total / n).backward()
    want = [p.grad for p in reference.parameters() if p.requires_grad]
    (got,) = captured
    assert len(got) == len(want) == 8  # A and B of q_proj and v_proj in two layers
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(logged["loss"] - float(total / n)) < 1e-5
