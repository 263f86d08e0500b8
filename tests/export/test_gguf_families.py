"""GGUF export of the SentencePiece tokenizers and of every family (Mistral, Qwen3, Gemma 1/2/3,
Phi-3), as full models and as LoRA adapters.

References the code did not produce: the SentencePiece library's own pieces, scores and types
(what llama.cpp's converter reads), transformers' GGUF loader (its tokenizer builder, which
recovers the merges from the scores, and its inverse tensor processors), and PEFT's merge.
llama.cpp itself runs these files under the `llamacpp` marker (test_llamacpp.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export_helpers import (
    FAMILY_STYLE,
    HELD_OUT,
    build_family_model,
    gguf_model,
    gguf_reader,
    logits,
    peft_adapter,
    spm_tokenizers,
)
from slimtune.errors import SlimtuneError
from slimtune.export import gguf_arch as ga
from slimtune.export.gguf import export_gguf, export_gguf_lora

ARCH = {"mistral": "llama", "gemma3_text": "gemma3"}


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """style -> SentencePiece tokenizer (Llama 2 / Mistral, Gemma, Phi-3 shaped)."""
    return spm_tokenizers(tmp_path_factory.mktemp("spm"))


def _ids(tokenizer, text=HELD_OUT) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("style", ["llama", "gemma", "phi3"])
def test_sentencepiece_pieces_scores_and_types_are_the_model_files(tmp_path, spm, style):
    import sentencepiece

    tokenizer = spm[style]
    kind = {"llama": "mistral", "gemma": "gemma2", "phi3": "phi3"}[style]
    model = build_family_model(kind, tokenizer)
    fields = gguf_reader(export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32")).fields
    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer.vocab_file)
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(tokens) == len(tokenizer) == model.config.vocab_size
    for i in range(sp.vocab_size()):  # llama.cpp's _create_vocab_sentencepiece, by hand
        if i in added:  # CONTROL if special, else USER_DEFINED (Gemma's turn markers here)
            expected = (added[i].content, -1000.0, 3 if added[i].special else 4)
            assert (tokens[i], scores[i], types[i]) == expected, i
            continue
        kind_of = 2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else 1
        assert (tokens[i], types[i]) == (sp.IdToPiece(i), kind_of), i
        assert scores[i] == pytest.approx(sp.GetScore(i)), i
    for i in range(sp.vocab_size(), len(tokens)):  # Phi-3's turn markers, added on top
        assert (tokens[i], types[i], scores[i]) == (added[i].content, 3, -1000.0)
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is (style != "gemma")
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert "tokenizer.ggml.merges" not in fields


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_sentencepiece_from_tokenizer_json_alone(tmp_path, spm, style):
    """No tokenizer.model (a directory transformers saved): scores from the merge ranks; the
    vocabulary transformers' GGUF reader rebuilds from them tokenizes like the original."""
    from transformers import AutoTokenizer

    original = spm[style]
    original.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.model").unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    tokenizer.vocab_file = None  # only tokenizer.json to go by
    kind = "mistral" if style == "llama" else "gemma2"
    model = build_family_model(kind, original)
    paths = [
        export_gguf(model, t, tmp_path / n / "m.gguf")
        for n, t in (("a", original), ("b", tokenizer))
    ]
    a, b = (gguf_reader(p).fields for p in paths)
    assert a["tokenizer.ggml.tokens"].contents() == b["tokenizer.ggml.tokens"].contents()
    assert a["tokenizer.ggml.token_type"].contents() == b["tokenizer.ggml.token_type"].contents()
    _, back = gguf_model(paths[1], None if kind == "mistral" else model.config)
    text = HELD_OUT + " Hello, world: 12345 \u00e9\u00e8 \U0001f600"  # byte fallback too
    assert _ids(back, text) == _ids(original, text)


@pytest.mark.parametrize("kind", ["mistral", "qwen3", "gemma2", "gemma3_text", "phi3"])
def test_family_reads_back_in_transformers(tmp_path, spm, kind):
    tokenizer = spm[FAMILY_STYLE[kind]]
    model = build_family_model(kind, tokenizer)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32")
    # transformers' GGUF config mapping misses head_dim (Qwen3) and the Gemma keys: give it ours
    config = None if kind in ("mistral", "phi3") else model.config
    back, back_tok = gguf_model(path, config)
    assert gguf_reader(path).fields["general.architecture"].contents() == ARCH.get(kind, kind)
    theirs = back.state_dict()
    for key, value in model.state_dict().items():  # Gemma norms: (w + 1) - 1, one f32 rounding
        assert torch.allclose(theirs[key], value, rtol=0, atol=1e-7), key
    ids = tokenizer(HELD_OUT, return_tensors="pt").input_ids
    assert (logits(model, ids) - logits(back, ids)).abs().max() <= 1e-5
    assert _ids(back_tok) == _ids(tokenizer)


def test_gemma_norms_are_written_plus_one(tmp_path, spm):
    """Gemma 1 (transformers' GGUF loader cannot read it): norm weights are 1 + w, tied head."""
    tokenizer = spm["gemma"]
    model = build_family_model("gemma", tokenizer)
    reader = gguf_reader(export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32"))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    norm = model.model.layers[1].post_attention_layernorm.weight.detach().numpy()
    assert np.array_equal(tensors["blk.1.ffn_norm.weight"], norm + 1)
    assert (
        "output.weight" not in tensors
        and reader.fields["general.architecture"].contents() == "gemma"
    )


def test_gemma3_sliding_window_keys(tmp_path, spm):
    tokenizer = spm["gemma"]
    model = build_family_model("gemma3_text", tokenizer)
    fields = gguf_reader(export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f16")).fields
    assert fields["gemma3.attention.sliding_window"].contents() == 8
    assert fields["gemma3.attention.sliding_window_pattern"].contents() == [True, False]
    assert fields["gemma3.rope.freq_base"].contents() == 1e6
    assert fields["gemma3.rope.freq_base_swa"].contents() == 1e4


# --- LoRA adapters --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mistral", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"])
def test_family_gguf_lora_applies_like_peft_merge(tmp_path, spm, kind):
    model = build_family_model(kind, spm[FAMILY_STYLE[kind]])
    fused = kind == "phi3"
    targets = ["qkv_proj", "gate_up_proj"] if fused else ["q_proj", "k_proj", "v_proj", "up_proj"]
    base = dict(
        ga.model_tensors({k: v.clone() for k, v in model.state_dict().items()}, model.config)
    )
    wrapped = peft_adapter(model, tmp_path / "adapter", target_modules=targets)
    path = export_gguf_lora(tmp_path / "adapter", model.config, tmp_path / "a.gguf", dtype="f32")
    reader = gguf_reader(path)
    assert reader.fields["general.architecture"].contents() == ARCH.get(kind, kind)
    lora = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    merged = dict(ga.model_tensors(wrapped.merge_and_unload().state_dict(), model.config))
    names = {n.rsplit(".", 1)[0] for n in lora}
    assert len(names) == 2 * len(targets)
    for name in names:  # llama.cpp adds alpha/r * B A to the base GGUF's weight
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        assert torch.allclose(base[name] + 8.0 / 4 * (b @ a), merged[name], atol=1e-5), name


def test_unsupported_architecture_lists_the_supported(tmp_path, spm):
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(SlimtuneError) as info:
        ga.family_of(config)
    message = str(info.value)
    assert "'gpt_neox'" in message and "\n" not in message
    assert message.endswith("supported: " + ", ".join(ga.FAMILIES))
