"""`slimtune demo` with a tiny model in place of SmolLM2, and the shipped demo data set."""

import dataclasses
import json

from slimtune.cli import demo
from slimtune.cli.main import main
from slimtune.config import LoraConfig


def rows(name):
    return [json.loads(line) for line in demo.demo_file(name).open()]


def test_held_out_rows_share_no_name_or_city_with_training_rows():
    def fields(row):
        surname_first, _, _, city = row["messages"][-1]["content"].split(" | ")
        last, first = surname_first.split(", ")
        return {first, last, city}

    seen = set().union(*(fields(r) for r in rows("train.jsonl")))
    held_out = rows("heldout.jsonl")
    assert len(held_out) == 40
    assert all(not (fields(r) & seen) for r in held_out)


def test_demo_prints_before_after_and_writes_the_run(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "MODEL", str(tiny_llama_dir))
    monkeypatch.setattr(demo, "LORA", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    monkeypatch.setattr(demo, "TRAIN", dataclasses.replace(demo.TRAIN, max_steps=2, save_every=1))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "held-out exact match:" in printed and "slimtune generate --model" in printed
    summary = json.loads((out / "summary.json").read_text())
    for split in ("before", "after"):
        assert summary[split]["rows"] == 40 and 0.0 <= summary[split]["exact_match"] <= 1.0
    assert {"adapter", "metrics.jsonl", "loss.png", "config.yaml", "checkpoints"} <= {
        p.name for p in out.iterdir()
    }
