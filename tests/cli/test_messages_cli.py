"""Messages that point the right way: each names what to type instead, and the pickle
conversion command is run to show that it writes what loading wants."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtune.cli.main import main
from slimtune.errors import SlimtuneError


def test_the_pickle_conversion_command_writes_what_loading_wants(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimtune.models import load_model, resolve_model_path

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    pickled = tmp_path / "pickled model"  # a space: the command quotes its paths
    pickled.mkdir()
    for path in tiny_llama_dir.iterdir():  # config and tokenizer; the weights as a pickle
        if path.suffix != ".safetensors":
            (pickled / path.name).write_bytes(path.read_bytes())
    torch.save(reference.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(SlimtuneError) as refused:
        resolve_model_path(str(pickled))
    message = str(refused.value)
    command = re.search(r"convert it once with: (python -c \".*?\")", message).group(1)
    argv = shlex.split(command)
    done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    assert (pickled / "model.safetensors").is_file()
    assert f"give --model {pickled}" in message
    model, _ = load_model(str(pickled))
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"{a} {a} {a}"}) + "\n" for a in range(8)))
    found = {"data": data}
    for method in ("lora", "full"):
        out = root / method
        argv = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out),
                "--method", method, "--max-steps", "1", "--batch-size", "4", "--quiet"]  # fmt: skip
        assert main(argv) == 0
        found[method] = out
    return found


def test_resume_of_a_directory_without_a_run(tmp_path, capsys):
    typo = tmp_path / "runs" / "typo"
    assert main(["train", "--resume", "--out", str(typo)]) == 1
    assert f"--resume: {typo} holds no run" in capsys.readouterr().err


def test_inspect_a_run_directory_points_to_its_adapter(runs, capsys):
    assert main(["inspect", str(runs["lora"])]) == 1
    assert f"its adapter is {runs['lora'] / 'adapter'}" in capsys.readouterr().err
    assert main(["inspect", str(runs["lora"] / "adapter")]) == 0


@pytest.mark.parametrize("command", ["eval", "generate", "merge"])
def test_a_full_fine_tuning_run_as_adapter_points_to_model(
    command, runs, tiny_llama_dir, tmp_path, capsys
):
    whole = runs["full"] / "adapter"
    extra = {"eval": ["--data", str(runs["data"])], "generate": ["--prompt", "1"],
             "merge": ["--out", str(tmp_path / "m")]}[command]  # fmt: skip
    argv = [command, "--model", str(tiny_llama_dir), "--adapter", str(whole), *extra]
    assert main(argv) == 1
    assert f"use it as --model {whole}, without --adapter" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
