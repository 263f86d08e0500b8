"""tensorboard.py: the event files, read back with TensorBoard's own reader, hold every
metrics.jsonl value at its step; an objective's extra scalars (rewards/*) go through as they are."""

import json

import pytest
from test_data import write_jsonl

from slimtune.config import TrainConfig
from slimtune.training.loop import train
from slimtune.training.tensorboard import TensorBoardLog

pytest.importorskip("tensorboard")


def read_scalars(directory) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_training_scalars_equal_metrics_jsonl(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    model.requires_grad_(True)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}, {"text": "general"}] * 2)
    config = TrainConfig(
        max_steps=3, batch_size=2, report_to="tensorboard", save_every=0, eval_every=2
    )
    out = tmp_path / "run"
    train(
        model, tokenizer, data, config, out, eval_data=data, save_fn=lambda m, d: None, quiet=True
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = read_scalars(out / "tensorboard")
    names = {"train/loss": "loss", "train/lr": "lr", "train/grad_norm": "grad_norm",
             "train/tokens_per_s": "tokens_per_s", "train/memory_mb": "memory_mb",
             "eval/loss": "eval_loss"}  # fmt: skip
    for tag, key in names.items():
        expected = {r["step"]: r[key] for r in records if key in r}
        assert set(scalars[tag]) == set(expected), tag
        for step, value in expected.items():
            assert scalars[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)
    assert set(scalars["train/loss"]) == {1, 2, 3} and set(scalars["eval/loss"]) == {2, 3}


def test_extra_scalars_of_an_objective_keep_their_names(tmp_path):
    log = TensorBoardLog(tmp_path)
    log.append({"step": 4, "loss": 0.5, "rewards/margin": 1.25, "note": "text", "flag": True})
    log.close()
    scalars = read_scalars(tmp_path)
    assert scalars == {"train/loss": {4: 0.5}, "rewards/margin": {4: 1.25}}


def test_resume_purges_the_events_after_the_checkpoint(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import slimtune as st

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}, {"text": "general"}] * 2)
    config = TrainConfig(max_steps=3, batch_size=2, report_to="tensorboard", save_every=2)
    out = tmp_path / "run"
    for resume in (False, True):  # the second run continues from the step-2 checkpoint
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        model = st.add_adapter(model, st.LoraConfig(r=2, target_modules=["q_proj"]))
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
        train(model, tokenizer, data, config, out, resume=resume, quiet=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = read_scalars(out / "tensorboard")["train/loss"]
    assert losses == pytest.approx({r["step"]: r["loss"] for r in records if "loss" in r})
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]  # step 3 once
