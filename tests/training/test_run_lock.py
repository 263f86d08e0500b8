"""One writer per run directory (training/run_lock.py): a second `slimtune train` on a
directory a live process writes is refused naming that PID; the lock of a process that was
killed is taken over; a finished run leaves no lock behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from slimtune.cli.main import main
from slimtune.training.run_lock import LOCK_NAME, check_unlocked, run_lock

HOLD = (
    "import sys, time; from pathlib import Path; from slimtune.training.run_lock import run_lock\n"
    "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)\n"
)


@pytest.fixture
def train_args(tiny_llama_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(8)))
    return ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--max-steps", "2",
            "--batch-size", "4", "--quiet"]  # fmt: skip


def test_live_writer_is_named_and_a_killed_ones_lock_is_taken_over(train_args, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*train_args, "--save-every", "1", "--out", str(run)]) == 0  # a run to resume
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--resume"], ["--overwrite"]):
            assert main([*train_args, "--out", str(run), *extra]) == 1
            err = capsys.readouterr().err.strip()
            assert err.startswith("slimtune train: error: ") and len(err.splitlines()) == 1
            assert f"is being written by process {holder.pid} " in err, err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK_NAME).read_text().strip() == str(holder.pid)  # left behind by the kill
    assert main([*train_args, "--out", str(run), "--overwrite"]) == 0  # taken over
    assert (run / "adapter").is_dir() and not (run / LOCK_NAME).exists()


def test_a_lock_file_nobody_holds_is_stale(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text("999999999\n")  # a PID that is not running
    check_unlocked(run)
    assert not (run / LOCK_NAME).exists()
    with run_lock(run):
        assert (run / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    assert not (run / LOCK_NAME).exists()


def test_the_same_process_cannot_write_one_run_twice(tmp_path):
    from slimtune.errors import SlimtuneError

    with run_lock(tmp_path), pytest.raises(SlimtuneError, match=f"process {os.getpid()} "):
        with run_lock(tmp_path):
            pass
