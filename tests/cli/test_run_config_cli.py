"""RUN/config.yaml holds resolved values and absolute paths: `train --config RUN/config.yaml`
works from another directory and trains the same modules (the reference: the first run's
adapter keys and shapes, and PEFT's default target modules for Llama)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_LORA
from safetensors.torch import load_file

from slimtune.cli.main import main


@pytest.fixture
def workdirs(tmp_path: Path, tiny_llama_dir: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(8)]
    (first / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return first, second


def shapes(run: Path) -> dict[str, tuple[int, ...]]:
    return {
        k: tuple(v.shape)
        for k, v in load_file(run / "adapter" / "adapter_model.safetensors").items()
    }


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_config_yaml_reruns_from_another_directory(method, workdirs, tiny_llama_dir, monkeypatch):
    first, second = workdirs
    monkeypatch.chdir(first)
    argv = ["train", "--model", str(tiny_llama_dir), "--data", "train.jsonl", "--out", "runs/x",
            "--method", method, "--max-steps", "1", "--batch-size", "4", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    saved = yaml.safe_load((first / "runs" / "x" / "config.yaml").read_text())
    assert saved["data"] == str(first / "train.jsonl") and saved["out"] == str(first / "runs/x")
    assert saved["rank"] == 8 and saved["alpha"] == 8 and saved["dropout"] == 0.0
    targets = set(saved["target_modules"].split(","))
    if method == "qlora":  # every linear layer but the output layer
        assert saved["quant"] == "nf4"
        assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"}  # fmt: skip
    else:
        assert targets == set(PEFT_LORA["llama"])
    monkeypatch.chdir(second)
    config = first / "runs" / "x" / "config.yaml"
    assert main(["train", "--config", str(config), "--out", "again", "--quiet"]) == 0
    assert shapes(second / "again") == shapes(first / "runs" / "x")
    again = yaml.safe_load((second / "again" / "config.yaml").read_text())
    assert {k: v for k, v in again.items() if k != "out"} == {
        k: v for k, v in saved.items() if k != "out"
    }


@pytest.mark.parametrize(
    ("method", "recorded", "absent"),
    [("ia3", {}, ["rank", "alpha", "quant"]), ("adapter", {"bottleneck_size": 64}, ["rank"]),
     ("prompt", {"num_virtual_tokens": 20}, ["rank", "target_modules"])],
)  # fmt: skip
def test_other_methods_record_their_own_options(
    method, recorded, absent, workdirs, tiny_llama_dir, monkeypatch
):
    first, _ = workdirs
    monkeypatch.chdir(first)
    argv = ["train", "--model", str(tiny_llama_dir), "--data", "train.jsonl", "--out", "r",
            "--method", method, "--max-steps", "1", "--batch-size", "4", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    saved = yaml.safe_load((first / "r" / "config.yaml").read_text())
    assert {k: saved[k] for k in recorded} == recorded
    assert not set(absent) & set(saved)
    assert None not in [saved[k] for k in ("dropout", "eval_data", "prompt_init") if k in saved]
    assert main(["train", "--config", "r/config.yaml", "--out", "r2", "--quiet"]) == 0
