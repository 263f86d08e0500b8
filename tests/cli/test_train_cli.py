"""`slimtune train` end to end: the run directory, resume after SIGKILL, every bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slimtune.cli.main import main


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data_file(tmp_path):
    rng = random.Random(0)
    rows = []
    for _ in range(24):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return write_rows(tmp_path / "train.jsonl", rows)


def test_run_directory_has_every_file(tiny_llama_dir, data_file, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.5\nmax_steps: 4\nrank: 4\n")
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_llama_dir), "--data", str(data_file), "--out", str(out),
            "--config", str(config), "--lr", "0.01", "--batch-size", "4", "--save-every", "1",
            "--eval-data", str(data_file), "--eval-every", "2", "--target-modules", "q_proj,v_proj"]  # fmt: skip
    assert main(argv) == 0
    assert "adapter:" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {
        "adapter", "checkpoints", "metrics.jsonl", "loss.png", "summary.json", "config.yaml"
    }  # fmt: skip
    assert {p.name for p in (out / "adapter").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors"
    }  # fmt: skip
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in steps)
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_loss", "eval_loss", "trainable_params", "total_params", "peak_memory_mb",
                "wall_time_s"):  # fmt: skip
        assert summary[key] is not None, key
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (resolved["lr"], resolved["max_steps"], resolved["rank"]) == (0.01, 4, 4)  # flag wins
    # PEFT itself reads the adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft_model = PeftModel.from_pretrained(base, out / "adapter")
    assert peft_model.peft_config["default"].r == 4


def run_cli(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "slimtune", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def test_sigkill_then_resume_is_bit_identical(tiny_llama_dir, data_file, tmp_path):
    steps = 16
    common = ["train", "--model", str(tiny_llama_dir), "--data", str(data_file),
              "--max-steps", str(steps), "--batch-size", "4", "--lr", "0.01", "--save-every", "3",
              "--dropout", "0.1", "--target-modules", "all-linear", "--quiet", "--seed", "3"]  # fmt: skip
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main([*common, "--out", str(reference)]) == 0

    kill_after = random.randint(3, steps // 2)  # a random step, past the first checkpoint
    proc = run_cli([*common, "--out", str(killed)])
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        logged = metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after
        if logged and any((killed / "checkpoints").glob("step-*")):  # past the first save
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"finished before the kill at step {kill_after}"
    assert not (killed / "summary.json").exists()

    assert main([*common, "--out", str(killed), "--resume"]) == 0
    ours = load_file(str(killed / "adapter/adapter_model.safetensors"))
    theirs = load_file(str(reference / "adapter/adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), f"{key} differs (killed after {kill_after})"
    losses = [
        [json.loads(x)["loss"] for x in (run / "metrics.jsonl").open()]
        for run in (killed, reference)
    ]
    assert losses[0] == losses[1]


CASES = {
    "bad json": (
        '{"prompt": "a", "completion": "b"}\n{"prompt": ',
        [],
        "train.jsonl:2: not valid JSON",
    ),
    "mixed": ('{"prompt": "a", "completion": "b"}\n{"text": "a"}\n', [], "train.jsonl:2: fields"),
    "missing": (
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n',
        [],
        "train.jsonl:2: fields",
    ),
    "empty": ("", [], "train.jsonl is empty"),
    "no assistant": (
        '{"messages": [{"role": "user", "content": "a"}]}\n',
        [],
        "train.jsonl:1: a messages row needs",
    ),
    "max steps": (None, ["--max-steps", "0"], "--max-steps 0 is not accepted: an integer > 0"),
    "batch size": (None, ["--batch-size", "-2"], "--batch-size -2 is not accepted"),
    "lr zero": (None, ["--lr", "0"], "--lr 0.0 is not accepted: a number in (0, 1]"),
    "lr big": (None, ["--lr", "3"], "--lr 3.0 is not accepted"),
    "rank zero": (None, ["--rank", "0"], "--rank 0 is not accepted: an integer > 0"),
    "config key": (None, ["--config", "CONFIG"], "unknown key 'learning_rte'; did you mean lr?"),
    "resume": (None, ["--resume"], "holds no run"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_one_line_and_writes_nothing(
    case, tiny_llama_dir, data_file, tmp_path, capsys
):
    content, extra, message = CASES[case]
    if content is not None:
        data_file.write_text(content)
    config = tmp_path / "c.yaml"
    config.write_text("learning_rte: 0.1\n")
    extra = [str(config) if x == "CONFIG" else x for x in extra]
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--model",
            str(tiny_llama_dir),
            "--data",
            str(data_file),
            "--out",
            str(out),
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert len(err.splitlines()) == 1 and err.startswith("slimtune train: error: "), err
    assert message in err
    assert not out.exists()


def test_existing_run_directory_is_not_overwritten(tiny_llama_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["train", "--model", str(tiny_llama_dir), "--data", str(data_file), "--out", str(out),
            "--max-steps", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main([*argv, "--overwrite"]) == 0
    # --overwrite replaces only a run's own files: the user's file stays
    assert (out / "keep.txt").read_text() == "mine" and (out / "adapter").is_dir()
