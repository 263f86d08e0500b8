"""Checked checkpoints: state.json carries the sha256 of every file and of itself. An altered
checkpoint (a flipped byte in trainable.safetensors, a state.json from another run) is refused
on --resume with one line, set aside, and the run resumes from the previous checkpoint,
ending bit-identical to a run that was never interrupted."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from slimtune.cli.main import main
from slimtune.training.checkpoints import list_checkpoints, verify_checkpoint


@pytest.fixture
def common(tiny_llama_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}*2=", "completion": str(2 * a)}) + "\n"
                            for a in range(16)))  # fmt: skip
    return ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--batch-size", "4",
            "--lr", "0.01", "--schedule", "constant", "--save-every", "2", "--quiet"]  # fmt: skip


def flip_last_byte(path) -> None:
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01  # inside the tensor data: still a valid safetensors file
    path.write_bytes(bytes(blob))


def adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("alteration", ["flipped byte", "foreign state.json"])
def test_altered_checkpoint_is_set_aside_and_the_previous_one_resumes(
    alteration, common, tmp_path, capsys
):
    run, other, reference = tmp_path / "run", tmp_path / "other", tmp_path / "reference"
    assert main([*common, "--max-steps", "6", "--out", str(run)]) == 0
    latest = run / "checkpoints" / "step-000006"
    verify_checkpoint(latest)  # as written: intact
    if alteration == "flipped byte":
        flip_last_byte(latest / "trainable.safetensors")
        named = latest / "trainable.safetensors"
    else:
        assert main([*common, "--max-steps", "6", "--seed", "7", "--out", str(other)]) == 0
        shutil.copy(other / "checkpoints" / "step-000006" / "state.json", latest / "state.json")
        named = latest / "optimizer.safetensors"  # the first file whose foreign checksum differs
    capsys.readouterr()
    assert main([*common, "--max-steps", "8", "--out", str(run), "--resume"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"--resume: {named} was altered or is missing (its checksum does not match); "
        "set aside as damaged-step-000006; resuming from step-000004"
    ]
    assert (run / "checkpoints" / "damaged-step-000006").is_dir()  # kept, not deleted
    assert main([*common, "--max-steps", "8", "--out", str(reference)]) == 0
    ours, theirs = adapter(run), adapter(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_no_intact_checkpoint_is_one_line(common, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*common, "--max-steps", "2", "--out", str(run)]) == 0
    (only,) = list_checkpoints(run)
    state = json.loads((only / "state.json").read_text())
    state["step"] = 1  # edited by hand
    (only / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main([*common, "--max-steps", "4", "--out", str(run), "--resume"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"slimtune train: error: --resume: {only / 'state.json'} was altered (its checksum does "
        "not match); no intact checkpoint to fall back to"
    )
