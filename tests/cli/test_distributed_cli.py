"""`slimtune train` under torchrun (2 processes, gloo on the CPU) against one process.

Two processes with --grad-accum 2 take the same steps as one process with --grad-accum 4
(the same global batch): same losses, same adapter. A 2-process run stopped after a
checkpoint resumes on 1 process (and a 1-process run on 2) and ends where the
uninterrupted run ends. The adapters have no empty tensor and load in PEFT.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from slimtune.cli.main import main

ROWS = [{"prompt": f"{w}?", "completion": f" {w[::-1]}!"} for w in
        ["abc", "hello", "cat", "moon", "tree", "slim", "tune", "lamp",
         "a", "bb", "sky", "river", "x", "stone", "owl", "quiet"]]  # fmt: skip
# 4 steps of 4 micro-batches of 2 rows; a small clip norm so that clipping acts on every step;
# alpha 16: the trajectory the tolerances below were set on (2 processes sum in another order)
SETTINGS = (
    "max_steps: 4\nbatch_size: 2\nlr: 0.02\nwarmup_steps: 1\nmax_grad_norm: 0.05\nalpha: 16\n"
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from conftest import build_tiny_llama_dir

    root = tmp_path_factory.mktemp("dist")
    model = build_tiny_llama_dir(root / "model", initializer_range=0.2)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    config = root / "run.yaml"
    config.write_text(SETTINGS)
    return model, data, config


def train_argv(inputs, out, method, accum):
    model, data, config = inputs
    return ["train", "--model", str(model), "--data", str(data), "--config", str(config),
            "--method", method, "--out", str(out), "--grad-accum", str(accum),
            "--save-every", "2", "--quiet"]  # fmt: skip


def torchrun(argv, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "slimtune", *argv]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def losses(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)]


def adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_run(run, ref):
    got, want = losses(run), losses(ref)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (got, want)
    a, b = adapter(run), adapter(ref)
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key].shape == b[key].shape and a[key].numel() > 0, key
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def cut_after_first_checkpoint(run, copy):
    """The run directory as a kill in step 4 leaves it: the step-4 checkpoint half-written
    under its temporary name, the step-4 metrics line cut."""
    shutil.copytree(run, copy)
    os.replace(copy / "checkpoints" / "step-000004", copy / "checkpoints" / ".tmp-step-000004")
    (copy / "checkpoints" / ".tmp-step-000004" / "state.json").unlink()
    lines = (copy / "metrics.jsonl").read_text().splitlines(keepends=True)
    (copy / "metrics.jsonl").write_text("".join(lines[:3]) + lines[3][:20])
    shutil.rmtree(copy / "adapter")
    (copy / "summary.json").unlink()
    return copy


@pytest.fixture(scope="module")
def lora_runs(inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    assert main(train_argv(inputs, root / "one", "lora", 4)) == 0
    torchrun(train_argv(inputs, root / "two", "lora", 2))
    return root / "one", root / "two"


@pytest.fixture(scope="module")
def qlora_runs(inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    assert main(train_argv(inputs, root / "one", "qlora", 4)) == 0
    assert main([*train_argv(inputs, root / "two", "qlora", 2), "--nproc", "2"]) == 0
    return root / "one", root / "two"


@pytest.mark.parametrize("runs", ["lora_runs", "qlora_runs"])
def test_two_processes_match_one(runs, request):
    one, two = request.getfixturevalue(runs)
    assert_same_run(two, one)
    summary, ref = (json.loads((r / "summary.json").read_text()) for r in (two, one))
    assert summary["trainable_params"] == ref["trainable_params"]
    assert summary["total_params"] == ref["total_params"]
    meta_two = (two / "adapter" / "adapter_config.json").read_text()
    assert meta_two == (one / "adapter" / "adapter_config.json").read_text()
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
    ]


@pytest.mark.parametrize("runs", ["lora_runs", "qlora_runs"])
def test_two_process_run_resumes_on_one(runs, request, tmp_path):
    one, two = request.getfixturevalue(runs)
    cut = cut_after_first_checkpoint(two, tmp_path / "cut")
    assert main(["train", "--out", str(cut), "--resume", "--quiet"]) == 0
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert_same_run(cut, two)
    assert_same_run(cut, one)


def test_one_process_qlora_run_resumes_on_two(qlora_runs, tmp_path):
    one, _ = qlora_runs
    cut = cut_after_first_checkpoint(one, tmp_path / "cut")
    assert main(["train", "--out", str(cut), "--resume", "--quiet", "--nproc", "2"]) == 0
    assert_same_run(cut, one)


@pytest.mark.parametrize("runs", ["lora_runs", "qlora_runs"])
def test_adapter_loads_in_peft(runs, request, inputs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    one, two = request.getfixturevalue(runs)
    ids = torch.tensor([[5, 40, 41, 42, 43, 10, 60]])

    def logits(run):
        base = AutoModelForCausalLM.from_pretrained(inputs[0], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, run / "adapter").eval()
        with torch.no_grad():
            return model(input_ids=ids).logits

    base = AutoModelForCausalLM.from_pretrained(inputs[0], dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    got, want = logits(two), logits(one)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the trained adapter is there, not zeros


def test_nproc_mistakes_are_one_line(inputs, tmp_path, capsys):
    argv = train_argv(inputs, tmp_path / "run", "lora", 1)
    assert main([*argv, "--nproc", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimtune train: error: --nproc 0") and "\n" not in err
