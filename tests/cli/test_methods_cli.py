"""Every method trains through `slimtune train --method …` on a tiny model and its loss falls."""

import json

import pytest

from slimtune.cli.main import main

ROWS = [{"prompt": f"{w}?", "completion": f" {w[::-1]}!"} for w in
        ["abc", "hello", "cat", "moon", "tree", "slim", "tune", "lamp"]]  # fmt: skip
# lr per method: a soft prompt and IA3 vectors need larger steps than LoRA's matrices
LR = {"dora": "1e-2", "ia3": "1e-1", "prompt": "5e-2", "adapter": "1e-2", "full": "3e-3"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The shared tiny Llama with larger initial weights: with std 0.02 and tied embeddings its
    logits stay within about ±0.6, which only full fine-tuning can grow out of."""
    from conftest import build_tiny_llama_dir

    return build_tiny_llama_dir(tmp_path_factory.mktemp("tiny"), initializer_range=0.2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def train(model, data, out, method, *extra):
    argv = ["train", "--model", str(model), "--data", str(data), "--out", str(out),
            "--method", method, "--max-steps", "8", "--batch-size", "8", "--lr", LR[method],
            "--schedule", "constant", "--save-every", "0", "--quiet", *extra]  # fmt: skip
    assert main(argv) == 0
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]  # fmt: skip


@pytest.mark.parametrize("method", ["dora", "ia3", "prompt", "adapter", "full"])
def test_method_trains_and_loss_falls(model_dir, data, tmp_path, method):
    losses = train(model_dir, data, tmp_path / "run", method)
    assert losses[-1] < 0.9 * losses[0], losses
    saved = tmp_path / "run" / "adapter"
    if method == "full":
        assert (saved / "model.safetensors").is_file() and (saved / "config.json").is_file()
        assert (saved / "tokenizer_config.json").is_file()
    else:
        peft_type = json.loads((saved / "adapter_config.json").read_text())["peft_type"]
        expected = {"dora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING",
                    "adapter": "BOTTLENECK"}  # fmt: skip
        assert peft_type == expected[method]


def test_prompt_init_text_and_sizes(model_dir, data, tmp_path):
    train(model_dir, data, tmp_path / "p", "prompt", "--num-virtual-tokens", "3",
          "--prompt-init", "Reverse:")  # fmt: skip
    config = json.loads((tmp_path / "p" / "adapter" / "adapter_config.json").read_text())
    assert config["num_virtual_tokens"] == 3 and config["prompt_tuning_init"] == "TEXT"
    train(model_dir, data, tmp_path / "a", "adapter", "--bottleneck-size", "5")
    config = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert config["bottleneck_size"] == 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "prompt", "--num-virtual-tokens", "0"], "--num-virtual-tokens 0 is not"),
        (["--method", "adapter", "--bottleneck-size", "0"], "--bottleneck-size 0 is not"),
        (["--method", "dora", "--target-modules", "embed_tokens"], "DoRA does not support"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(model_dir, data, tmp_path, capsys,
                                                  extra, message):  # fmt: skip
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out),
            "--max-steps", "1", "--quiet", *extra]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_unknown_method_lists_the_methods(model_dir, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", str(model_dir), "--data", str(data), "--out",
              str(tmp_path / "r"), "--method", "lorax"])  # fmt: skip
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert all(m in err for m in ["lora", "qlora", "dora", "ia3", "prompt", "adapter", "full"])
