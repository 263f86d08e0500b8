"""No silent no-ops: a flag the chosen method or command would ignore is a one-line error
naming the flag and what it needs, before anything is loaded or written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimtune.cli.main import main


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(8)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out),
            "--max-steps", "2", "--batch-size", "4", "--quiet", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "lora", "--quant", "nf4"], "--quant nf4 needs --method qlora"),
        (["--method", "dora", "--quant", "fp4"], "--quant fp4 needs --method qlora"),
        (["--method", "ia3", "--rank", "4"], "--rank 4 needs --method lora or qlora or dora"),
        (["--method", "prompt", "--alpha", "16"], "--alpha 16.0 needs --method lora"),
        (["--method", "adapter", "--dropout", "0.1"], "--dropout 0.1 needs --method lora"),
        (["--method", "full", "--target-modules", "q_proj"], "--target-modules q_proj needs"),
        (["--method", "prompt", "--target-modules", "q_proj"], "--target-modules q_proj needs"),
        (["--method", "lora", "--num-virtual-tokens", "4"], "--num-virtual-tokens 4 needs"),
        (["--method", "lora", "--prompt-init", "hi"], "--prompt-init hi needs --method prompt"),
        (["--method", "ia3", "--bottleneck-size", "8"], "--bottleneck-size 8 needs --method adapter"),
        (["--method", "adapter", "--target-modules", "all-linear"], "is not for --method adapter"),
        (["--eval-every", "1"], "--eval-every 1 needs --eval-data"),
        (["--resume", "--overwrite"], "give one"),
    ],
)  # fmt: skip
def test_a_flag_that_does_nothing_is_an_error(
    flags, message, tiny_llama_dir, data_file, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(train_argv(tiny_llama_dir, data_file, out, *flags)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_a_config_key_that_does_nothing_names_the_file_and_line(
    tiny_llama_dir, data_file, tmp_path, capsys
):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.01\nquant: nf4\n")
    argv = train_argv(tiny_llama_dir, data_file, tmp_path / "run", "--config", str(config))
    assert main(argv) == 1
    assert f"{config}:2: quant: nf4 needs --method qlora" in capsys.readouterr().err


def test_flags_that_apply_are_accepted(tiny_llama_dir, data_file, tmp_path):
    argv = train_argv(tiny_llama_dir, data_file, tmp_path / "run", "--method", "adapter",
                      "--target-modules", "mlp", "--bottleneck-size", "4",
                      "--eval-data", str(data_file), "--eval-every", "1")  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "eval_loss" in r] == [1, 2]


@pytest.fixture(scope="module")
def qlora_run(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qlora")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"{a} {a} {a}"}) + "\n" for a in range(8)))
    argv = train_argv(tiny_llama_dir, data, root / "run", "--method", "qlora", "--rank", "2")
    assert main(argv) == 0
    return root / "run" / "adapter", data


def eval_loss(model: Path, adapter: Path, data: Path, tmp_path: Path, *flags: str) -> float:
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(model), "--adapter", str(adapter), "--data", str(data)]
    assert main([*argv, "--json", str(out), "--quiet", *flags]) == 0
    return json.loads(out.read_text())["loss"]


def test_eval_quant_must_match_the_adapters_record(qlora_run, tiny_llama_dir, tmp_path, capsys):
    adapter, data = qlora_run
    recorded = eval_loss(tiny_llama_dir, adapter, data, tmp_path)
    assert eval_loss(tiny_llama_dir, adapter, data, tmp_path, "--quant", "nf4") == recorded
    argv = ["eval", "--model", str(tiny_llama_dir), "--adapter", str(adapter), "--data", str(data)]
    assert main([*argv, "--quant", "fp4"]) == 1
    assert "trained on a nf4 base" in capsys.readouterr().err
    assert main([*argv, "--quantize", "fp4"]) == 1  # the old spelling too
    forced = eval_loss(tiny_llama_dir, adapter, data, tmp_path, "--quant", "fp4", "--force")
    assert forced != recorded  # another base was really used
    assert main([*argv, "--force"]) == 1
    assert "none to confirm" in capsys.readouterr().err


def test_merge_into_original_needs_a_qlora_adapter(qlora_run, tiny_llama_dir, tmp_path, capsys):
    import peft
    from transformers import AutoModelForCausalLM

    lora = tmp_path / "lora"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        lora
    )
    argv = ["merge", "--model", str(tiny_llama_dir), "--into", "original"]
    assert main([*argv, "--adapter", str(lora), "--out", str(tmp_path / "m")]) == 1
    assert "--into original needs a QLoRA adapter" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_generate_seed_needs_sampling(tiny_llama_dir, capsys):
    argv = ["generate", "--model", str(tiny_llama_dir), "--prompt", "1+1=", "--seed", "3"]
    assert main(argv) == 1
    assert "--seed 3 needs --temperature > 0" in capsys.readouterr().err


def test_compare_rank_needs_a_lora_method(tiny_llama_dir, data_file, tmp_path, capsys):
    argv = ["compare", "--model", str(tiny_llama_dir), "--data", str(data_file),
            "--methods", "ia3,prompt", "--rank", "4", "--out", str(tmp_path / "c")]  # fmt: skip
    assert main(argv) == 1
    assert "--rank 4 needs lora, qlora or dora in --methods" in capsys.readouterr().err
