"""Training runs as child processes: one at a time (a second is refused and says so);
Stop keeps the last checkpoint and Resume continues it from there (that a resumed run
ends bit-identical to an uninterrupted one is tests/training's); a failing command ends
with its one error line."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from slimtune.errors import SlimtuneError
from slimtune.ui.jobs import Jobs
from slimtune.ui.runs import checkpoint_steps


def wait(check, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.fixture
def root(tmp_path, tiny_llama_dir):
    shutil.copytree(tiny_llama_dir, tmp_path / "tiny")
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def train_args(out, steps=200):
    return ["train", "--model", "tiny", "--data", "d.jsonl", "--out", out, "--max-steps",
            str(steps), "--save-every", "2", "--batch-size", "2", "--lr", "1e-3",
            "--schedule", "constant"]  # fmt: skip


def test_one_run_at_a_time_stop_keeps_the_checkpoint_resume_continues(root):
    jobs = Jobs(root)
    job = jobs.start("train", [train_args("runs/a")], target=root / "runs" / "a")
    wait(lambda: len(checkpoint_steps(root / "runs" / "a")) > 0)
    with pytest.raises(SlimtuneError, match="refused, not queued: a train job is already running"):
        jobs.start("compare", [["compare", "--help"]])
    job.stop()
    wait(lambda: not job.running)
    assert job.status() == "stopped"
    kept = checkpoint_steps(root / "runs" / "a")
    assert kept, "stopping removed the checkpoints"
    resumed = jobs.start("train", [["train", "--out", "runs/a", "--resume", "--max-steps",
                                    str(kept[-1] + 2)]], target=root / "runs" / "a")  # fmt: skip
    wait(lambda: not resumed.running)
    assert resumed.status() == "finished", resumed.message()
    records = [json.loads(x) for x in (root / "runs/a/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, kept[-1] + 3))  # no step lost or twice
    assert (root / "runs" / "a" / "adapter" / "adapter_config.json").is_file()


def test_a_failing_command_ends_with_its_one_line(root):
    jobs = Jobs(root)
    job = jobs.start("train", [["train", "--model", "tiny", "--data", "missing.jsonl",
                                "--out", "runs/x"]])  # fmt: skip
    wait(lambda: not job.running, 120)
    assert job.status() == "failed"
    assert job.message().startswith("slimtune train: error:") and "missing.jsonl" in job.message()
