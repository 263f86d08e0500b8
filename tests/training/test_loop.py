"""train.py and loss.py: schedule, the loss against transformers' own, learning, NaN stop."""

import json
import math
import random

import pytest
import torch

import slimtune as st
from slimtune.config import TrainConfig
from slimtune.errors import SlimtuneError
from slimtune.models import load_model
from slimtune.training.data import collate, load_dataset
from slimtune.training.loop import lr_factor, train
from slimtune.training.loss import causal_lm_loss


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return rows


@pytest.fixture
def arithmetic_file(tmp_path):
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(64)))
    return path


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_matches_the_formula(schedule):
    config = TrainConfig(max_steps=10, warmup_steps=2, schedule=schedule)
    got = [lr_factor(s, config) for s in range(10)]
    assert got[:2] == pytest.approx([1 / 3, 2 / 3])
    progress = [(s - 2) / 8 for s in range(2, 10)]
    expected = {
        "linear": [1 - p for p in progress],
        "cosine": [0.5 * (1 + math.cos(math.pi * p)) for p in progress],
        "constant": [1.0] * 8,
    }[schedule]
    assert got[2:] == pytest.approx(expected)


def test_loss_and_gradients_match_transformers(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    rows = [
        {"prompt": "12+30=", "completion": "42"},
        {"prompt": "1+1=", "completion": "2"},
        {"prompt": "7+8=", "completion": "15"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch = collate(load_dataset(path, tokenizer, 64).examples, tokenizer.pad_token_id)
    model.requires_grad_(True)

    loss_sum, count = causal_lm_loss(model, batch, chunk=3)
    (loss_sum / count).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference = model(**batch).loss  # transformers' mean over the label tokens
    reference.backward()
    assert count == sum(len(r["completion"]) + 1 for r in rows)
    torch.testing.assert_close(loss_sum / count, reference, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_lora_loss_falls_on_arithmetic(make_tiny_llama_dir, arithmetic_file, tmp_path):
    # embeddings large enough that the tied output layer can be confident (std 0.02 cannot)
    model, tokenizer = load_model(make_tiny_llama_dir(initializer_range=0.2))
    torch.manual_seed(0)
    model = st.add_adapter(model, st.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    config = TrainConfig(max_steps=40, batch_size=16, lr=3e-2, save_every=0, warmup_steps=2)
    summary = train(model, tokenizer, arithmetic_file, config, tmp_path / "run", quiet=True)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run/metrics.jsonl").open()]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    assert summary["trainable_params"] == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_full_fine_tuning_with_a_save_hook_and_accumulation(tiny_llama, arithmetic_file, tmp_path):
    model, tokenizer = tiny_llama
    model.requires_grad_(True)
    config = TrainConfig(max_steps=6, batch_size=4, grad_accum=2, lr=3e-3, save_every=3)
    summary = train(
        model, tokenizer, arithmetic_file, config, tmp_path / "run", quiet=True,
        save_fn=lambda m, d: m.save_pretrained(d),
    )  # fmt: skip
    assert (tmp_path / "run/adapter/model.safetensors").is_file()
    assert summary["trainable_params"] == summary["total_params"]
    assert summary["train_tokens"] > 0 and summary["final_loss"] < summary["first_loss"]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_llama, arithmetic_file, tmp_path):
    model, tokenizer = tiny_llama
    model = st.add_adapter(model, st.LoraConfig(r=2, target_modules=["q_proj"]))
    calls = []

    def loss_fn(model, batch, chunk):
        calls.append(1)
        loss_sum, count = causal_lm_loss(model, batch, chunk)
        return (loss_sum * float("nan") if len(calls) == 3 else loss_sum), count

    config = TrainConfig(max_steps=5, batch_size=4, save_every=2)
    with pytest.raises(SlimtuneError, match="step 3: the loss is nan.*step-000002"):
        train(
            model, tokenizer, arithmetic_file, config, tmp_path / "run", quiet=True, loss_fn=loss_fn
        )
    assert [p.name for p in (tmp_path / "run/checkpoints").iterdir()] == ["step-000002"]
    assert not (tmp_path / "run/adapter").exists()


def test_nothing_to_train_is_refused(tiny_llama, arithmetic_file, tmp_path):
    model, tokenizer = tiny_llama
    model.requires_grad_(False)
    with pytest.raises(SlimtuneError, match="no parameter that requires grad"):
        train(model, tokenizer, arithmetic_file, TrainConfig(), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
