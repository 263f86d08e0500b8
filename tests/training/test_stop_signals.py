"""Ctrl-C and SIGTERM during `slimtune train` (subprocesses): the first signal finishes the
step, writes a checkpoint and ends with `stopped at step N; continue with --resume`, and the
resumed run ends bit-identical to one never stopped; a second signal stops at once and the
last complete checkpoint still resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from slimtune.cli.main import main
from slimtune.training.checkpoints import list_checkpoints

STEPS = 40


@pytest.fixture
def common(tiny_llama_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) + "\n"
                            for a in range(24)))  # fmt: skip
    return ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--batch-size", "4",
            "--lr", "0.01", "--max-steps", str(STEPS), "--quiet", "--seed", "1"]  # fmt: skip


def start(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "slimtune", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for_steps(proc, run, n: int) -> None:
    metrics, deadline = run / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before step {n}: {proc.poll()}")


def adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_checkpoints_and_resume_is_bit_identical(common, tmp_path, signum):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    proc = start([*common, "--save-every", "0", "--out", str(stopped)])
    wait_for_steps(proc, stopped, 3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signum, err
    last = err.strip().splitlines()[-1]
    step = int(last.split("stopped at step ")[1].split(";")[0])
    assert last == f"slimtune train: stopped at step {step}; continue with --resume"
    assert 3 <= step < STEPS
    assert [p.name for p in list_checkpoints(stopped)] == [f"step-{step:06d}"]  # --save-every 0
    assert not (stopped / "adapter").exists()
    if signum == signal.SIGTERM:  # the same path as SIGINT from here on: resumed once, there
        return
    assert main([*common, "--out", str(stopped), "--resume"]) == 0
    assert main([*common, "--save-every", "0", "--out", str(reference)]) == 0
    ours, theirs = adapter(stopped), adapter(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), f"differs (stopped at {step})"


def test_second_signal_stops_at_once_and_the_last_checkpoint_resumes(common, tmp_path):
    run = tmp_path / "run"
    proc = start([*common, "--save-every", "2", "--out", str(run)])
    wait_for_steps(proc, run, 5)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode in (130, 128 + signal.SIGINT), err  # at once, or the step was done
    assert "Traceback" not in err
    assert list_checkpoints(run), "no complete checkpoint left"
    assert not list((run / "checkpoints").glob(".tmp-*")), "a half-written checkpoint remains"
    assert main([*common, "--out", str(run), "--resume"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
