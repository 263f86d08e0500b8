"""Each `slimtune train --method …` trains exactly the parameters PEFT would: the same count
(PEFT's get_nb_trainable_parameters) and the same tensors in the adapter file (PEFT's own
save_pretrained), with the CLI's defaults. The base model stays as it was. The bottleneck
adapter has no PEFT twin: its count is written out by hand; full fine-tuning trains all."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from slimtune.cli.main import main

PEFT_CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=8, lora_alpha=8, task_type="CAUSAL_LM"),
    "qlora": lambda: peft.LoraConfig(
        r=8, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"
    ),  # fmt: skip
    "dora": lambda: peft.LoraConfig(r=8, lora_alpha=8, use_dora=True, task_type="CAUSAL_LM"),
    "ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM"),
    "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM"),
}


def shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"{w} {w}"}) + "\n" for w in ["ab", "cd", "ef"]))
    return path


def train(model: Path, data: Path, out: Path, method: str) -> dict:
    argv = ["train", "--model", str(model), "--data", str(data), "--out", str(out),
            "--method", method, "--max-steps", "1", "--batch-size", "3", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_the_trained_parameters_are_peft_s(method, tiny_llama_dir, data, tmp_path):
    summary = train(tiny_llama_dir, data, tmp_path / "run", method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about tied embeddings: not under test
        theirs = peft.get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_llama_dir), PEFT_CONFIGS[method]()
        )
        theirs.save_pretrained(tmp_path / "peft")
    trainable, total = theirs.get_nb_trainable_parameters()
    assert summary["trainable_params"] == trainable
    ours = shapes(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert ours == shapes(tmp_path / "peft" / "adapter_model.safetensors")


def test_bottleneck_trains_its_adapters_only(tiny_llama_dir, data, tmp_path):
    summary = train(tiny_llama_dir, data, tmp_path / "run", "adapter")
    d, m, blocks = 32, 64, 2 * 2  # hidden size, bottleneck width, (attention, MLP) × 2 layers
    assert summary["trainable_params"] == blocks * (d * m + m + m * d + d)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert summary["total_params"] == sum(p.numel() for p in base.parameters()) + (
        blocks * (d * m + m + m * d + d)
    )


def test_full_trains_every_parameter(tiny_llama_dir, data, tmp_path):
    summary = train(tiny_llama_dir, data, tmp_path / "run", "full")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert summary["trainable_params"] == summary["total_params"]
    assert summary["total_params"] == sum(p.numel() for p in base.parameters())
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "adapter")
    moved = [n for (n, p), q in zip(base.named_parameters(), trained.parameters(), strict=True)
             if not torch.equal(p, q)]  # fmt: skip
    assert len(moved) == len(list(base.parameters()))
