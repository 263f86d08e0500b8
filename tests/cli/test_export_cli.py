"""`slimtune export` end to end: PEFT-written adapters in, files read back by transformers.

The adapted model (the reference) is PEFT's; the exported files are read by plain
transformers (in a process where slimtune cannot be imported, for safetensors) and by
transformers' GGUF loader.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from export_helpers import (
    HELD_OUT,
    build_bpe_tokenizer,
    build_model,
    gguf_model,
    logits,
    peft_adapter,
    save_model_dir,
)
from slimtune.cli.main import main

READ_BACK = """
import sys
sys.modules["slimtune"] = None  # no slimtune: plain transformers only
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
out, text, dest = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
ids = AutoTokenizer.from_pretrained(out)(text, return_tensors="pt").input_ids
with torch.no_grad():
    save_file({"logits": model(ids).logits.contiguous()}, dest)
"""


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer()


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, tokenizer):
    """(model dir, adapter dir, PEFT logits on HELD_OUT) for a tiny Llama with a random LoRA."""
    root = tmp_path_factory.mktemp("export-cli")
    model = build_model("llama", len(tokenizer))
    save_model_dir(model, tokenizer, root / "model")
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    wrapped = peft_adapter(model, root / "adapter", target_modules=targets)
    ids = tokenizer(HELD_OUT, return_tensors="pt").input_ids
    return root / "model", root / "adapter", logits(wrapped.eval(), ids)


def _export(*args: str | Path) -> int:
    return main(["export", *map(str, args)])


def test_merged_safetensors_loads_without_slimtune(tmp_path, adapted):
    from safetensors.torch import load_file

    model_dir, adapter_dir, reference = adapted
    out = tmp_path / "merged"
    assert _export("--model", model_dir, "--adapter", adapter_dir, "--format", "safetensors",
                   "--out", out) == 0  # fmt: skip
    dest = tmp_path / "logits.safetensors"
    subprocess.run([sys.executable, "-c", READ_BACK, out, HELD_OUT, dest], check=True)
    assert (load_file(dest)["logits"] - reference).abs().max() <= 1e-4
    assert not any("lora" in p.name for p in out.iterdir())


def test_gguf_with_adapter_matches_adapted_model(tmp_path, adapted, tokenizer):
    model_dir, adapter_dir, reference = adapted
    assert _export("--model", model_dir, "--adapter", adapter_dir, "--format", "gguf",
                   "--dtype", "f32", "--out", tmp_path) == 0  # fmt: skip
    back, _ = gguf_model(tmp_path / "model.gguf")
    ids = tokenizer(HELD_OUT, return_tensors="pt").input_ids
    assert (logits(back, ids) - reference).abs().max() <= 1e-4
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./model.gguf")


def test_gguf_lora_from_the_command_line(tmp_path, adapted):
    from gguf import GGUFReader

    model_dir, adapter_dir, _ = adapted
    out = tmp_path / "adapter.gguf"
    assert _export("--model", model_dir, "--adapter", adapter_dir, "--format", "gguf-lora",
                   "--out", out) == 0  # fmt: skip
    reader = GGUFReader(out)
    names = {t.name for t in reader.tensors}
    assert len(names) == 2 * 4 * 2 and "blk.1.ffn_down.weight.lora_b" in names
    assert reader.fields["adapter.lora.alpha"].contents() == 8.0


def test_gguf_in_gguf_out_keeps_the_layout(tmp_path, monkeypatch, tokenizer):
    from gguf import GGUFReader

    from slimtune.export.gguf import export_gguf

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    source = export_gguf(build_model("qwen2", len(tokenizer)), tokenizer, tmp_path / "in.gguf")
    assert _export("--model", source, "--format", "gguf", "--out", tmp_path / "out.gguf",
                   "--overwrite") == 0  # fmt: skip
    a, b = GGUFReader(source), GGUFReader(tmp_path / "out.gguf")
    assert [(t.name, t.tensor_type, list(t.shape)) for t in a.tensors] == [
        (t.name, t.tensor_type, list(t.shape)) for t in b.tensors
    ]
    for ta, tb in zip(a.tensors, b.tensors, strict=True):  # f16 -> f32 -> f16 is exact
        assert bytes(ta.data) == bytes(tb.data), ta.name
    keys = [k for k in a.fields if k.startswith(("tokenizer.", "qwen2."))]
    assert keys == [k for k in b.fields if k.startswith(("tokenizer.", "qwen2."))]
    for key in keys:
        assert a.fields[key].contents() == b.fields[key].contents(), key


def test_bad_input_is_one_line(tmp_path, adapted, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir, adapter_dir, _ = adapted
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300))
    save_model_dir(gpt2, build_bpe_tokenizer(), tmp_path / "gpt2")
    cases = [
        (["--model", tmp_path / "gpt2", "--format", "gguf", "--out", tmp_path / "g"], "'gpt2'"),
        (["--model", model_dir, "--format", "safetensors", "--out", adapter_dir], "--overwrite"),
        (["--model", model_dir, "--format", "gguf-lora", "--out", tmp_path / "l"], "--adapter"),
        (
            [
                "--model",
                model_dir,
                "--format",
                "safetensors",
                "--dtype",
                "q8_0",
                "--out",
                tmp_path / "s",
            ],
            "safetensors takes",
        ),  # fmt: skip
        (
            [
                "--model",
                model_dir,
                "--adapter",
                adapter_dir,
                "--format",
                "gguf-lora",
                "--dtype",
                "q4_k_m",
                "--out",
                tmp_path / "l",
            ],
            "is for a whole model",
        ),  # fmt: skip
    ]
    for args, expected in cases:
        capsys.readouterr()
        assert _export(*args) == 1
        err = capsys.readouterr().err.strip()
        assert (
            err.count("\n") == 0 and expected in err and err.startswith("slimtune export: error:")
        )
    assert not (tmp_path / "g").exists() and not (tmp_path / "s").exists()


def test_llamacpp_types_without_the_extra_say_how_to_install(
    tmp_path, adapted, capsys, monkeypatch
):
    model_dir, adapter_dir, _ = adapted
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    out = tmp_path / "q"
    assert _export("--model", model_dir, "--adapter", adapter_dir, "--format", "gguf",
                   "--dtype", "q4_k_m", "--out", out) == 1  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--dtype q4_k_m" in err and "slimtune[llamacpp]" in err
    assert not out.exists()


def test_ollama_format_writes_gguf_and_modelfile_and_prints_the_commands(tmp_path, adapted, capsys):
    model_dir, adapter_dir, reference = adapted
    out = tmp_path / "My Model"
    assert _export("--model", model_dir, "--adapter", adapter_dir, "--format", "ollama",
                   "--dtype", "f32", "--out", out) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        f"wrote {out / 'model.gguf'}",
        f"ollama create my-model -f '{out / 'Modelfile'}'",
        "ollama run my-model",
    ]
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n") and "TEMPLATE" in modelfile
    back, _ = gguf_model(out / "model.gguf")
    ids = build_bpe_tokenizer()(HELD_OUT, return_tensors="pt").input_ids
    assert (logits(back, ids) - reference).abs().max() <= 1e-4
