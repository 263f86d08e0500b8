"""A run directory as the page shows it: progress, ETA, status and the loss curve's points,
computed by hand from the files a run writes."""

from __future__ import annotations

import json
import os
import re
import time

from slimtune.ui.runs import loss_chart, progress, progress_line, run_status


def write_run(run, records, max_steps=10):
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"method: lora\nmodel: tiny\nmax_steps: {max_steps}\n")
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run / "metrics.jsonl").write_text(lines + '{"step": 9, "loss": 1.')  # a line cut by a kill


def test_progress_and_eta_from_the_metrics(tmp_path):
    records = [{"step": 1, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 50.0, "tokens": 120},
               {"step": 2, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 60.0, "tokens": 240},
               {"step": 2, "eval_loss": 2.7, "eval_perplexity": 14.9}]  # fmt: skip
    write_run(tmp_path / "r", records)
    info = progress(tmp_path / "r")
    assert (info["step"], info["max_steps"], info["loss"], info["eval_loss"]) == (2, 10, 2.5, 2.7)
    assert info["eta_s"] == (10 - 2) * (240 / 2) / 60.0  # steps left · tokens per step / rate
    line = progress_line(info)
    assert "step 2/10" in line and "loss 2.5000" in line and "ETA 0:16" in line


def test_the_chart_has_one_point_per_logged_step(tmp_path):
    records = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 6)] + [
        {"step": 5, "eval_loss": 2.9}
    ]
    svg = loss_chart(records)
    assert 'data-train-points="5"' in svg and 'data-eval-points="1"' in svg
    assert len(re.findall(r'class="train-point"', svg)) == 5
    ys = [float(y) for y in re.findall(r'class="train-point" cx="[\d.]+" cy="([\d.]+)"', svg)]
    assert ys == sorted(ys)  # falling loss: each point lower on the page (larger y)
    assert 'data-train-points="0"' in loss_chart([])


def test_status_of_runs_written_by_the_cli(tmp_path):
    run = tmp_path / "r"
    write_run(run, [{"step": 1, "loss": 1.0}])
    assert run_status(run, None) == "running (outside the app)"  # metrics just written
    old = time.time() - 3600
    os.utime(run / "metrics.jsonl", (old, old))
    assert run_status(run, None) == "stopped (no checkpoint yet)"
    (run / "checkpoints" / "step-000004").mkdir(parents=True)
    assert run_status(run, None) == "stopped (checkpoint at step 4, resumable)"
    (run / "summary.json").write_text("{}")
    assert run_status(run, None) == "finished"
