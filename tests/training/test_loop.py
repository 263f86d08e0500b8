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


@pytest.mark.parametrize("split", [True, False], ids=["chunked-head", "model-loss"])
def test_loss_and_gradients_match_transformers(tiny_llama, tmp_path, monkeypatch, split):
    """Both ways causal_lm_loss runs: the decoder then the chunked output layer, and (for a
    model it cannot split) the model's own loss times the label count."""
    from slimtune.training import loss as loss_module

    if not split:
        monkeypatch.setattr(loss_module, "split_model", lambda model: None)
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


def test_a_batch_without_labels_has_no_loss(tiny_llama):
    model, _ = tiny_llama
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.full_like(ids, -100)}  # fmt: skip
    loss_sum, count = causal_lm_loss(model, batch)
    assert count == 0 and loss_sum.shape == () and loss_sum.item() == 0.0


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
            ],
        ),
    ],
)
def test_lora_loss_falls_on_arithmetic(make_tiny_llama_dir, arithmetic_file, tmp_path, device):
    """On the GPU through the fused kernels and fused AdamW too: a forward that kept using
    stale weights (kernels/compute_copies.py before the step count) fails here."""
    # embeddings large enough that the tied output layer can be confident (std 0.02 cannot)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    directory = make_tiny_llama_dir(initializer_range=0.2)
    model, tokenizer = load_model(directory, dtype=dtype, device=device)
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
    config = TrainConfig(max_steps=8, batch_size=4, grad_accum=2, lr=3e-3, save_every=3)
    summary = train(
        model, tokenizer, arithmetic_file, config, tmp_path / "run", quiet=True,
        save_fn=lambda m, d: m.save_pretrained(d),
    )  # fmt: skip
    assert (tmp_path / "run/adapter/model.safetensors").is_file()
    assert summary["trainable_params"] == summary["total_params"]
    assert summary["final_loss"] < summary["first_loss"]
    # 8 steps of 2 micro-batches of 4 rows: the 64 rows once, every micro-batch counted
    rows = load_dataset(arithmetic_file, tokenizer, config.max_length).examples
    assert summary["train_tokens"] == sum(len(r.input_ids) for r in rows)


def nan_at_step(n: int):
    """The usual loss, NaN at call n; and the list of calls made."""
    calls = []

    def loss_fn(model, batch, chunk):
        calls.append(1)
        loss_sum, count = causal_lm_loss(model, batch, chunk)
        return (loss_sum * float("nan") if len(calls) == n else loss_sum), count

    return loss_fn, calls


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_llama, arithmetic_file, tmp_path):
    model, tokenizer = tiny_llama
    model = st.add_adapter(model, st.LoraConfig(r=2, target_modules=["q_proj"]))
    loss_fn, _ = nan_at_step(3)
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


def test_rows_gathered_by_a_host_index_equal_the_boolean_selection():
    from slimtune.training.loss import rows_by_host_index

    torch.manual_seed(0)
    base = torch.randn(3, 9, 5, dtype=torch.float64)  # two virtual tokens, then 7 positions
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :4] = labels[2, 5:] = -100
    keep = labels[:, 1:] != -100
    outputs = []
    for select in (lambda h: (h[:, :-1][keep], labels[:, 1:][keep]), rows_by_host_index):
        hidden = base.clone().requires_grad_(True)
        args = (labels, keep) if select is rows_by_host_index else ()
        rows, targets = select(hidden[:, 2:], *args)
        (rows * torch.arange(rows.numel(), dtype=rows.dtype).view_as(rows)).sum().backward()
        outputs.append((rows.detach(), targets, hidden.grad))
    for ours, reference in zip(outputs[1], outputs[0], strict=True):
        assert torch.equal(ours, reference)


def fused_adamw(params, config):
    """torch's fused AdamW on the CPU: the loop then reads each step's loss a step late."""
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_steps_read_a_step_late_log_and_train_as_checked_steps(
    make_tiny_llama_dir, arithmetic_file, tmp_path, monkeypatch
):
    from slimtune.training import loop

    monkeypatch.setattr(loop, "make_optimizer", fused_adamw)
    runs = []
    for deferred in (True, False):
        monkeypatch.setattr(loop, "skips_on_device", lambda optimizer, d=deferred: d)
        model, tokenizer = load_model(make_tiny_llama_dir())
        torch.manual_seed(0)
        model = st.add_adapter(model, st.LoraConfig(r=4, target_modules="all-linear"))
        config = TrainConfig(max_steps=7, batch_size=4, lr=1e-2, save_every=3, log_every=2)
        out = tmp_path / f"run-{deferred}"
        summary = train(model, tokenizer, arithmetic_file, config, out, quiet=True)
        records = [json.loads(x) for x in (out / "metrics.jsonl").open()]
        keys = ("step", "loss", "lr", "grad_norm", "tokens")
        runs.append(([{k: r[k] for k in keys} for r in records], adapter_state(model), summary))
    (late, late_weights, late_summary), (checked, weights, summary) = runs
    assert [r["step"] for r in checked] == [2, 4, 6, 7]
    assert late == checked
    assert late_summary["train_tokens"] == summary["train_tokens"]
    for name, value in weights.items():
        assert torch.equal(late_weights[name], value), name


def test_a_nan_read_a_step_late_skips_its_update_and_stops(
    tiny_llama, arithmetic_file, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    from slimtune.training import loop

    monkeypatch.setattr(loop, "make_optimizer", fused_adamw)
    model, tokenizer = tiny_llama
    model = st.add_adapter(model, st.LoraConfig(r=2, target_modules=["q_proj"]))
    loss_fn, calls = nan_at_step(3)
    config = TrainConfig(max_steps=6, batch_size=4, save_every=2)
    with pytest.raises(SlimtuneError, match="step 3: the loss is nan.*step-000002"):
        train(
            model, tokenizer, arithmetic_file, config, tmp_path / "run", quiet=True, loss_fn=loss_fn
        )
    assert len(calls) == 4  # step 4 ran its forward and backward, not its update
    saved = load_file(tmp_path / "run/checkpoints/step-000002/trainable.safetensors")
    for name, value in adapter_state(model).items():
        assert torch.equal(value, saved[name]), name  # step 3's update was skipped
    steps = [json.loads(x)["step"] for x in (tmp_path / "run/metrics.jsonl").open()]
    assert steps == [1, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_step_never_waits_for_the_gpu(make_tiny_llama_dir, tmp_path):
    """slimtune's code waits for the GPU about as often in 4 steps as in 12 (loading, step 1's
    plan, saving the adapter): no step waits, so the next one is queued while the GPU runs.
    (transformers' own check for packed rows in create_causal_mask waits once a forward.)"""
    import traceback
    import warnings

    directory = make_tiny_llama_dir()
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": "ab " * 200}) + "\n" for _ in range(64)))
    waits = {}
    shown = warnings.showwarning

    def count(message, *args, **kwargs):
        if "synchroniz" not in str(message):
            return shown(message, *args, **kwargs)
        where = [f.filename for f in traceback.extract_stack()]
        if not any("masking_utils" in f for f in where):
            waits[steps].append(next((f for f in reversed(where) if "slimtune" in f), "-"))

    for steps in (4, 12):
        waits[steps] = []
        model, tokenizer = load_model(directory, dtype=torch.bfloat16, device="cuda")
        model = st.add_adapter(model, st.LoraConfig(r=4, target_modules="all-linear"))
        config = TrainConfig(
            max_steps=steps, batch_size=4, max_length=128, save_every=0, log_every=1
        )
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = count
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(model, tokenizer, rows, config, tmp_path / f"r{steps}", quiet=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        records = [json.loads(x) for x in (tmp_path / f"r{steps}/metrics.jsonl").open()]
        assert [r["step"] for r in records] == list(range(1, steps + 1))
    # a wait inside every step would add 8; the one-off ones can differ by a stray one
    assert len(waits[12]) - len(waits[4]) < 12 - 4, waits
