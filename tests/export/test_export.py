"""export.py / gguf_file.py / export_ollama.py against transformers' GGUF loader and gguf-py.

References the code did not produce: transformers' own GGUF reader (its inverse rope
permutation and its tokenizer builder), the `gguf` package's Q8_0 quantize/dequantize
(bit-exact with ggml-quants.c), GGML's Q8_0 definition written out by hand, and PEFT's
LoRA merge.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export_helpers import (
    CHAT_TEMPLATE,
    HELD_OUT,
    SYSTEM,
    build_bpe_tokenizer,
    build_model,
    fit,
    gguf_model,
    gguf_reader,
    logits,
    peft_adapter,
    perplexity,
)
from slimtune.atomic import _umask
from slimtune.errors import SlimtuneError
from slimtune.export import gguf_arch as ga
from slimtune.export import gguf_file as gg
from slimtune.export.gguf import export_gguf, export_gguf_lora
from slimtune.export.merged import export_safetensors


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gguf_f32_reads_back_identical(tmp_path, tokenizer, kind):
    model = build_model(kind, len(tokenizer))
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32")
    back, back_tok = gguf_model(path)
    ids = tokenizer(HELD_OUT, return_tensors="pt").input_ids
    assert torch.equal(back_tok(HELD_OUT, return_tensors="pt").input_ids, ids)
    assert (logits(model, ids) - logits(back, ids)).abs().max() <= 1e-4
    ours, theirs = model.state_dict(), back.state_dict()
    for key, value in ours.items():  # bit-identical: the permutation is the exact inverse
        assert torch.equal(value, theirs[key]), key
    names = {t.name for t in gguf_reader(path).tensors}
    assert ("output.weight" in names) == (kind == "llama")  # qwen2 fixture is tied
    assert "blk.1.attn_q.weight" in names and "blk.0.ffn_down.weight" in names


def test_rope_permutation_inverts_transformers_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(4 * 16, 24)  # 4 heads of 16 rows
    back = LlamaTensorProcessor()._reverse_permute_weights(ga.permute_for_rope(w, 4).numpy(), 4)
    assert torch.equal(torch.from_numpy(back), w)
    assert torch.equal(ga.unpermute_for_rope(ga.permute_for_rope(w, 4), 4), w)
    # llama.cpp's convert_hf_to_gguf.py permute(), written out: rows (h, 2, d/2) -> (h, d/2, 2)
    head = w[:16]
    expected = torch.stack([head[:8], head[8:]], dim=1).reshape(16, 24)
    assert torch.equal(ga.permute_for_rope(w, 4)[:16], expected)


def test_gguf_f16_and_bf16_within_rounding(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer))
    ids = tokenizer(HELD_OUT, return_tensors="pt").input_ids
    for dtype, torch_dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        path = export_gguf(model, tokenizer, tmp_path / dtype / "m.gguf", dtype=dtype)
        back, _ = gguf_model(path)
        theirs = back.state_dict()
        for key, value in model.state_dict().items():
            rounded = value if value.ndim == 1 else value.to(torch_dtype).float()
            assert torch.equal(theirs[key], rounded), (dtype, key)
        assert (logits(model, ids) - logits(back, ids)).abs().max() < 0.05


def test_q8_0_blocks_follow_the_ggml_definition():
    torch.manual_seed(0)
    w = torch.randn(6, 128) * 3
    w[0, :32] = 0  # an all-zero block: d = 0
    w[1, :32] = torch.arange(32) - 15.5  # halves: x/d lands on .5 steps
    raw = gg.encode_tensor(w, "q8_0").data
    assert raw.dtype == np.uint8 and raw.shape == (6, 4 * 34)
    for row, col in ((0, 0), (1, 0), (3, 2)):  # GGML's block_q8_0, by hand
        block = w[row, 32 * col : 32 * (col + 1)].double()
        d = float(block.abs().max()) / 127
        q = [int(np.sign(x) * np.floor(abs(x) / d + 0.5)) if d else 0 for x in block.tolist()]
        packed = raw[row, 34 * col : 34 * (col + 1)]
        assert packed[:2].view(np.float16)[0] == np.float16(d)
        assert packed[2:].view(np.int8).tolist() == q


def test_q8_0_perplexity_within_one_percent_of_f32(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer))
    fit(model, tokenizer)
    f32, _ = gguf_model(export_gguf(model, tokenizer, tmp_path / "a" / "m.gguf", dtype="f32"))
    q8, _ = gguf_model(export_gguf(model, tokenizer, tmp_path / "b" / "m.gguf", dtype="q8_0"))
    ppl_f32, ppl_q8 = perplexity(f32, tokenizer), perplexity(q8, tokenizer)
    assert ppl_f32 < len(tokenizer) / 4  # trained: far from uniform
    assert abs(ppl_q8 - ppl_f32) / ppl_f32 < 0.01
    types = {t.name: t.tensor_type.name for t in gguf_reader(tmp_path / "b" / "m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_q8_0_falls_back_to_f16_for_short_rows(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer), intermediate_size=80)  # ffn_down rows: 80
    said: list[str] = []
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="q8_0", say=said.append)
    types = {t.name: t.tensor_type.name for t in gguf_reader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"
    notes = [line for line in said if "q8_0" in line]
    assert len(notes) == 1 and "2 tensor(s)" in notes[0] and "f16" in notes[0]
    back, _ = gguf_model(path)
    down = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(back.model.layers[0].mlp.down_proj.weight, down.half().float())


def test_gguf_metadata_carries_tokenizer_and_chat_template(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer) + 4)  # padded embedding: 4 unused rows
    fields = gguf_reader(export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f16")).fields
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens[: len(by_id)] == [t for t, _ in by_id] and len(tokens) == len(tokenizer) + 4
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert fields["tokenizer.ggml.merges"].contents() == [
        " ".join(m) for m in spec["model"]["merges"]
    ]
    types = fields["tokenizer.ggml.token_type"].contents()
    specials = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")]
    assert [types[i] for i in specials] == [3, 3] and types[-1] == 5 and types[100] == 1
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # llama-vocab.cpp spelling
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"].contents() == tokenizer.pad_token_id
    assert fields["tokenizer.ggml.unknown_token_id"].contents() == tokenizer.unk_token_id
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.rope.dimension_count"].contents() == 16


def test_modelfile_beside_the_gguf_carries_its_chat_template(tmp_path, tokenizer):
    """The Modelfile is made from what the GGUF states (template, BOS/EOS, add_bos); its Go
    template is checked against Jinja in test_ollama.py."""
    from slimtune.export.ollama import chat_turns, go_template

    model = build_model("qwen2", len(tokenizer))
    export_gguf(model, tokenizer, tmp_path, dtype="f16")
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n")
    turns = chat_turns(CHAT_TEMPLATE, "<|im_start|>", "<|im_end|>", add_bos=False)
    assert f'TEMPLATE """{go_template(turns)}"""' in text
    assert f'SYSTEM """{SYSTEM}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>user"' in text


def test_unknown_architecture_is_named(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer)))
    with pytest.raises(
        SlimtuneError,
        match=r"'gpt2'.*supported: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3$",
    ):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_existing_output_is_refused(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer))
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32")
    before = path.read_bytes()
    with pytest.raises(SlimtuneError, match="--overwrite"):
        export_gguf(model, tokenizer, path, dtype="f16")
    assert path.read_bytes() == before
    export_gguf(model, tokenizer, path, dtype="f16", overwrite=True)
    assert path.stat().st_size < len(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_safetensors_export_is_sharded_and_loads(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_model("qwen2", len(tokenizer))
    out = export_safetensors(model, tokenizer, tmp_path / "merged", max_shard_size="60KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "generation_config.json").is_file() and (out / "config.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokenizer(HELD_OUT, return_tensors="pt").input_ids
    assert (logits(model, ids) - logits(back, ids)).abs().max() <= 1e-6
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE


# --- GGUF LoRA ------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_gguf_lora_names_shapes_alpha_and_merge(tmp_path, tokenizer, rslora):
    model = build_model("llama", len(tokenizer))
    state = {k: v.clone() for k, v in model.state_dict().items()}  # PEFT merges in place
    base = dict(ga.model_tensors(state, model.config))
    wrapped = peft_adapter(
        model,
        tmp_path / "adapter",
        use_rslora=rslora,
        rank_pattern={"model.layers.1.self_attn.v_proj": 2},
        alpha_pattern={r"layers\.0\.self_attn\.q_proj": 32},
    )
    q0 = wrapped.base_model.model.model.layers[0].self_attn.q_proj
    assert q0.scaling["default"] == (16.0 if rslora else 8.0)  # the alpha_pattern took effect
    path = export_gguf_lora(tmp_path / "adapter", model.config, tmp_path / "a.gguf", dtype="f32")
    reader = gguf_reader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 8.0
    lora = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    expected = {
        f"blk.{i}.attn_{p}.weight.lora_{ab}"
        for i in range(2)
        for p in ("q", "k", "v", "output")
        for ab in "ab"
    }
    assert set(lora) == expected
    assert lora["blk.0.attn_k.weight.lora_a"].shape == (4, 64)
    assert lora["blk.0.attn_k.weight.lora_b"].shape == (32, 4)  # 2 kv heads of 16
    assert lora["blk.1.attn_v.weight.lora_b"].shape == (32, 2)  # rank_pattern
    # llama.cpp applies W + alpha/r * B A to the base GGUF: it must equal the merged model's GGUF
    merged = dict(ga.model_tensors(wrapped.merge_and_unload().state_dict(), model.config))
    for name in {n.rsplit(".", 1)[0] for n in lora}:
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        applied = base[name] + 8.0 / a.shape[0] * (b @ a)
        assert torch.allclose(applied, merged[name], atol=1e-5), name


def test_gguf_lora_refuses_non_lora(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer))
    peft_adapter(model, tmp_path / "adapter", modules_to_save=["lm_head"])
    with pytest.raises(SlimtuneError, match="not a LoRA A/B matrix"):
        export_gguf_lora(tmp_path / "adapter", model.config, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
