"""`slimtune compare` end to end on a tiny model, and the report's sentences from its numbers."""

import json

import pytest

from slimtune.cli.main import main
from slimtune.compare.report import findings
from slimtune.compare.run import CompareSettings, jobs, parse_methods, parse_ranks
from slimtune.errors import SlimtuneError

ROWS = [{"prompt": f"{w}?", "completion": f" {w[::-1]}!"} for w in
        ["abc", "hello", "cat", "moon", "tree", "slim", "tune", "lamp", "star", "kite"]]  # fmt: skip


def test_compare_runs_end_to_end(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    out = tmp_path / "report"
    argv = ["compare", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out),
            "--methods", "lora,prompt", "--ranks", "2", "--max-steps", "2", "--batch-size", "4",
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["base", "lora", "prompt", "lora-r2"]
    rows = {r["label"]: r for r in report["runs"]}
    # LoRA r=2 on every linear layer of 2 layers: r·(in+out) for q, k, v, o, gate, up, down
    per_layer = (32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + 2 * (32 + 64) + (64 + 32)
    assert rows["lora-r2"]["trainable_params"] == 2 * 2 * per_layer
    # 20 soft tokens of width 32
    assert rows["prompt"]["trainable_params"] == 20 * 32
    assert rows["prompt"]["extra_context_tokens"] == 20
    assert rows["lora"]["merged_ms_per_token"] > 0 and "merged_ms_per_token" not in rows["prompt"]
    assert 0 <= rows["lora"]["exact_match"] <= 1 and rows["lora"]["adapter_bytes"] > 0
    md = (out / "report.md").read_text()
    for name in ("quality_vs_params.png", "memory.png", "train_speed.png", "latency.png",
                 "rank_sweep.png"):  # fmt: skip
        assert (out / name).stat().st_size > 1000 and f"]({name})" in md
    assert "Prompt tuning backpropagates through the whole model" in md
    assert not (out / "runs").exists()


def test_findings_follow_the_numbers():
    def run(label, **values):
        base = {"label": label, "method": label, "trainable_params": 10, "total_params": 100,
                "heldout_loss": 1.0, "ms_per_token": 10.0}  # fmt: skip
        return {**base, **values}

    slow = {"runs": [run("base", trainable_params=0), run("adapter", ms_per_token=13.0),
                     run("lora", ms_per_token=12.0, merged_ms_per_token=10.2)]}  # fmt: skip
    text = " ".join(findings(slow))
    assert "Bottleneck adapters add inference latency" in text and "+30%" in text
    assert "Merged LoRA adds no latency" in text
    fast = {"runs": [run("base", trainable_params=0), run("adapter", ms_per_token=10.1),
                     run("lora", ms_per_token=12.0, merged_ms_per_token=12.0)]}  # fmt: skip
    text = " ".join(findings(fast))
    assert "did not measurably add" in text and "still differs by +20%" in text


def test_bad_input():
    with pytest.raises(SlimtuneError, match="unknown method 'lorax'; methods: lora, qlora"):
        parse_methods("lora,lorax")
    with pytest.raises(SlimtuneError, match="--sweep-ranks"):
        parse_ranks("1,0")
    settings = CompareSettings(model="m", data="d", eval_data="e", methods=("lora",), ranks=(8, 4))
    assert [j["label"] for j in jobs(settings)] == ["base", "lora", "lora-r4"]
