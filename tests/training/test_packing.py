"""packing.py: best-fit decreasing against a plain reference; packed rows have the losses and
gradients they have alone (fp32, 1e-5), with SDPA and eager attention."""

import random

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.training.data import IGNORE_INDEX, Dataset, Example, collate
from slimtune.training.loss import causal_lm_loss
from slimtune.training.packing import best_fit_decreasing, pack_dataset, pack_examples


def reference_bfd(lengths, capacity):
    """Best-fit decreasing as the textbook states it: O(n · bins)."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if not fits:
            bins.append([i])
            room.append(capacity - lengths[i])
            continue
        best = min(fits, key=lambda b: (room[b], b))
        bins[best].append(i)
        room[best] -= lengths[i]
    return bins


def test_best_fit_decreasing_equals_the_reference():
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 64)
    assert bins == reference_bfd(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= sum(lengths) / 64 * 1.05 + 1  # nearly full


def rows(n=7, seed=0):
    """Rows of 2-11 tokens; some with a prompt that has no loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 90, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g)
        labels = ids.tolist()
        if i % 2:
            labels[: len(labels) // 2] = [IGNORE_INDEX] * (len(labels) // 2)
        out.append(Example(ids.tolist(), labels, line=i + 1))
    return out


def test_packed_rows_restart_positions_and_mask_the_boundary():
    examples = rows()
    packed = pack_examples(examples, 24)
    assert sum(len(p.input_ids) for p in packed) == sum(len(e.input_ids) for e in examples)
    assert all(len(p.input_ids) <= 24 for p in packed)
    for p in packed:
        starts = [i for i, pos in enumerate(p.position_ids) if pos == 0]
        assert all(p.labels[s] == IGNORE_INDEX for s in starts)
    batch = collate(packed, pad_id=0)
    short = int(batch["attention_mask"].sum(1).argmin())
    n = int(batch["attention_mask"][short].sum())
    tail = batch["position_ids"][short, n:].tolist()
    assert tail == list(range(len(tail)))  # padding: a block of its own


def per_token_losses(model, batch):
    drop = ("labels", "attention_mask") if "position_ids" in batch else ("labels",)
    out = model(**{k: v for k, v in batch.items() if k not in drop}, use_cache=False)
    logits = out.logits[:, :-1].float()  # (B, T-1, V)
    targets = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, T-1)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_losses_and_gradients_equal_unpacked(tiny_llama_dir, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.float32, attn_implementation=attention
    )
    examples = rows()
    packed = pack_examples(examples, 24)
    assert any(len([x for x in p.position_ids if x == 0]) > 1 for p in packed)  # real packing

    alone = []
    model.zero_grad()
    for ex in examples:
        batch = collate([ex], pad_id=0)
        alone.append(per_token_losses(model, batch)[0].sum().detach())
        loss, _ = causal_lm_loss(model, batch)
        loss.backward()
    grads_alone = {n: p.grad.clone() for n, p in model.named_parameters()}

    batch = collate(packed, pad_id=0)
    losses = per_token_losses(model, batch)
    together = {}
    for b, p in enumerate(packed):
        starts = [i for i, pos in enumerate(p.position_ids) if pos == 0] + [len(p.input_ids)]
        for s, e in zip(starts, starts[1:], strict=False):
            key = (tuple(p.input_ids[s:e]), tuple(p.labels[s + 1 : e]))
            together[key] = losses[b, s : e - 1].sum().detach()  # targets s+1 … e-1
    for ex, loss in zip(examples, alone, strict=True):
        assert float(together[(tuple(ex.input_ids), tuple(ex.labels[1:]))]) == pytest.approx(
            float(loss), abs=1e-5
        )
    model.zero_grad()
    loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads_alone[name], atol=1e-5, rtol=1e-5)

    # without the position ids rows would see each other: the losses would differ
    crossed = per_token_losses(model, {k: v for k, v in batch.items() if k != "position_ids"})
    losses = losses.detach()
    assert not torch.allclose(crossed.sum(), losses.sum(), atol=1e-3)


def test_trainer_step_loss_is_the_same_packed(tiny_llama_dir, tmp_path):
    from test_data import write_jsonl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimtune.config import TrainConfig
    from slimtune.training.loop import train

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab" * (i % 5 + 1)} for i in range(12)])
    first = {}
    for packing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        model.requires_grad_(True)
        config = TrainConfig(
            max_steps=1, batch_size=12, max_length=32, packing=packing, save_every=0
        )
        summary = train(
            model, AutoTokenizer.from_pretrained(tiny_llama_dir), data, config,
            tmp_path / f"run-{packing}", save_fn=lambda m, d: None, quiet=True,
        )  # fmt: skip
        first[packing] = summary["first_loss"]
        assert summary["train_tokens"] == sum(2 * (i % 5 + 1) + 1 for i in range(12))
    assert first[True] == pytest.approx(first[False], abs=1e-5)


def test_an_exact_fit_goes_into_the_bin_it_fills():
    # 6 opens bin 0 with room 4; the first 4 fits it exactly and must go there, not open a bin
    assert best_fit_decreasing([6, 4, 4], 10) == [[0, 1], [2]]


def test_a_packed_sequence_is_named_by_its_first_row_and_pairs_are_refused():
    ign = IGNORE_INDEX
    rows = [Example([1, 2], [ign, 2], line=7), Example([3, 4, 5], [ign, 4, 5], line=3)]
    data = Dataset("d.jsonl", "prompt_completion", rows, [{}, {}])
    packed = pack_dataset(data, 8)
    assert len(packed.examples) == 1 and packed.examples[0].line == 7  # the first row's
    assert packed.examples[0].input_ids == [1, 2, 3, 4, 5]  # file order inside the sequence
    with pytest.raises(SlimtuneError, match=r"^--packing packs SFT rows \(--objective sft\)"):
        pack_dataset(object(), 8)
