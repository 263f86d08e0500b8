"""The streamed merge (export/streamed_merge.py) against the in-memory merge it replaces.

The reference is the in-memory path (`slimtune.cli.merge.merged_model` + `save_pretrained`,
what `slimtune merge` wrote before), and PEFT's own `merge_and_unload` for the logits. The
bases are tiny random Llamas saved in several shards.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
import weakref
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

import slimtune as st
from export_helpers import build_bpe_tokenizer
from slimtune.cli.main import main
from slimtune.cli.merge import merged_model
from slimtune.export import streamed_merge as sm
from slimtune.export.streamed_merge import StreamedMerge, streamed_merge
from slimtune.quant.linear import quant_metadata
from tiny_models import trained_qlora

SHARD = "24KB"  # the tiny model (≈ 150 KB in fp32) in several shards
TARGETS = ["q_proj", "v_proj", "down_proj"]


def sharded_base(path: Path, *, dtype=torch.float32, tie: bool = False) -> Path:
    """A tiny random Llama saved in shards of SHARD, with a byte-level BPE tokenizer (GGUF)."""
    tokenizer = build_bpe_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tie, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).save_pretrained(path, max_shard_size=SHARD)
    tokenizer.save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file()
    return path


def peft_adapter(base: Path, out: Path, config) -> torch.nn.Module:
    """Write a PEFT adapter (non-zero, as after training); return PEFT's merged model."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(copy.deepcopy(model), config)
        with torch.no_grad():  # IA3 vectors and DoRA magnitudes away from their start too
            for name, p in peft_model.named_parameters():
                if "ia3_l" in name or "magnitude" in name or "modules_to_save" in name:
                    p.add_(torch.randn_like(p) * 0.1)
        peft_model.save_pretrained(out)
        return None if config.is_prompt_learning else peft_model.merge_and_unload().eval()


def write_both(base: Path, adapter: Path, tmp: Path, into: str = "trained") -> tuple[Path, Path]:
    """(in-memory merge saved by save_pretrained, streamed merge) as two directories."""
    reference, streamed = tmp / f"memory-{into}", tmp / f"streamed-{into}"
    model, _ = merged_model(str(base), adapter, into)
    model.save_pretrained(reference, max_shard_size=SHARD)
    plan = streamed_merge(str(base), adapter, into)
    assert isinstance(plan, StreamedMerge), "the streamed path declined"
    streamed.mkdir()
    plan.write(streamed, SHARD)
    return reference, streamed


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            found |= {key: handle.get_tensor(key) for key in handle.keys()}
    return found


def assert_same_directory(reference: Path, streamed: Path) -> None:
    """Same files, same index and configs, and every tensor equal in value and dtype."""
    assert sorted(p.name for p in streamed.iterdir()) == sorted(p.name for p in reference.iterdir())
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        if (reference / name).is_file():  # (a classifier has no generation config)
            assert (streamed / name).read_text() == (reference / name).read_text(), name
    expected, got = tensors(reference), tensors(streamed)
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        # same float32 arithmetic in the same order on the CPU: bit for bit
        assert torch.equal(got[key], value), key
    for file in streamed.glob("*.safetensors"):  # written as safetensors' save_file writes
        assert file.read_bytes() == (reference / file.name).read_bytes(), file.name


def assert_logits(directory: Path, reference: torch.nn.Module, atol: float = 1e-5) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.randint(3, 90, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gap = (loaded(ids).logits - reference.float()(ids).logits).abs().max()
    assert gap <= atol


CASES = {
    "lora": peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, init_lora_weights=False),
    "rslora": peft.LoraConfig(
        target_modules=TARGETS,
        r=4,
        lora_alpha=6,
        use_rslora=True,
        init_lora_weights=False,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3},
    ),  # fmt: skip
    "dora": peft.LoraConfig(
        target_modules=["q_proj", "up_proj"],
        r=4,
        lora_alpha=8,
        use_dora=True,
        init_lora_weights=False,
    ),  # fmt: skip
    "ia3": peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        init_ia3_weights=False,
    ),  # fmt: skip
    "modules_to_save": peft.LoraConfig(
        target_modules=["q_proj"],
        r=2,
        lora_alpha=4,
        init_lora_weights=False,
        modules_to_save=["lm_head"],
    ),  # fmt: skip
}


@pytest.fixture(autouse=True)
def on_cpu(request, monkeypatch):
    """The merge arithmetic on the CPU, where it is bit for bit the in-memory path's (the
    `gpu` test compares the GPU's within a tolerance)."""
    if "gpu" not in request.keywords:
        monkeypatch.setattr(sm, "merge_device", lambda: torch.device("cpu"))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return sharded_base(tmp_path_factory.mktemp("sharded") / "base")


@pytest.mark.parametrize("method", list(CASES))
def test_streamed_equals_the_in_memory_merge(method, base, tmp_path):
    reference_model = peft_adapter(base, tmp_path / "adapter", CASES[method])
    reference, streamed = write_both(base, tmp_path / "adapter", tmp_path)
    assert_same_directory(reference, streamed)
    assert_logits(streamed, reference_model)  # PEFT's merge: the merge was applied, and right
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    changed = [k for k, v in tensors(streamed).items() if not torch.equal(v, plain.state_dict()[k])]
    assert changed and all(
        any(t in k for t in ("q_", "k_", "v_", "up_", "down_", "lm_head")) for k in changed
    )


def test_bf16_base_is_written_in_bf16_and_matches(tmp_path):
    base = sharded_base(tmp_path / "base", dtype=torch.bfloat16)
    peft_adapter(base, tmp_path / "adapter", CASES["lora"])
    reference, streamed = write_both(base, tmp_path / "adapter", tmp_path)
    assert_same_directory(reference, streamed)
    assert {v.dtype for v in tensors(streamed).values()} == {torch.bfloat16}
    assert json.loads((streamed / "config.json").read_text())["dtype"] == "bfloat16"


def _qlora_adapter(base: Path, out: Path) -> torch.nn.Module:
    """A slimtune QLoRA adapter (NF4 base) with non-zero B, as after training."""
    model = trained_qlora(base, "nf4")
    st.save_adapter(model, out, metadata=quant_metadata(model))
    return model


def test_qlora_into_trained_and_original(base, tmp_path):
    trained_model = _qlora_adapter(base, tmp_path / "adapter")
    reference, streamed = write_both(base, tmp_path / "adapter", tmp_path, "trained")
    assert_same_directory(reference, streamed)
    assert_logits(streamed, trained_model, atol=1e-4)  # the model the adapter trained as
    reference, original = write_both(base, tmp_path / "adapter", tmp_path, "original")
    assert_same_directory(reference, original)
    with pytest.raises(AssertionError):  # the base's original weights: not the trained model
        assert_logits(original, trained_model, atol=1e-4)


def test_tied_embeddings_are_left_out_as_save_pretrained_does(tmp_path):
    base = sharded_base(tmp_path / "base", tie=True)
    reference_model = peft_adapter(base, tmp_path / "adapter", CASES["lora"])
    reference, streamed = write_both(base, tmp_path / "adapter", tmp_path)
    assert_same_directory(reference, streamed)
    assert "lm_head.weight" not in tensors(streamed)
    assert_logits(streamed, reference_model)


def test_adapter_on_a_tied_weight_keeps_the_in_memory_path(tmp_path):
    base = sharded_base(tmp_path / "base", tie=True)
    config = peft.LoraConfig(target_modules=["embed_tokens"], r=2, init_lora_weights=False)
    peft_adapter(base, tmp_path / "adapter", config)
    assert streamed_merge(str(base), tmp_path / "adapter") is None  # merging unties it


def test_host_memory_holds_one_module_at_a_time(base, tmp_path, monkeypatch):
    """Count the base and merged tensors alive at each read: at most one module's (weight
    and bias), whatever the shard size; a merge that held a shard or the model fails."""
    peft_adapter(base, tmp_path / "adapter", CASES["dora"])
    plan = streamed_merge(str(base), tmp_path / "adapter")
    alive: dict[int, weakref.ref] = {}
    peaks = []

    def track(tensor: torch.Tensor) -> torch.Tensor:
        alive[id(tensor)] = weakref.ref(tensor)
        return tensor

    read, merged = plan.read, plan.merged

    def counting_read(key):
        peaks.append(sum(ref() is not None for ref in alive.values()))
        return track(read(key))

    monkeypatch.setattr(plan, "read", counting_read)
    monkeypatch.setattr(plan, "merged", lambda key: track(merged(key)))
    (tmp_path / "out").mkdir()
    plan.write(tmp_path / "out", "1GB")  # one shard holding every tensor
    assert len(tensors(tmp_path / "out")) == len(peaks) > 10
    assert max(peaks) <= 2
    assert sum(ref() is not None for ref in alive.values()) == 0


def test_cli_merge_and_export_stream_into_the_same_directory(base, tmp_path, monkeypatch):
    peft_adapter(base, tmp_path / "adapter", CASES["lora"])

    def no_full_load(*args, **kwargs):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr("slimtune.cli.merge.merged_model", no_full_load)
    monkeypatch.setattr("slimtune.cli.export.merged_model", no_full_load)
    argv = ["--model", str(base), "--adapter", str(tmp_path / "adapter")]
    assert main(["merge", *argv, "--out", str(tmp_path / "merged")]) == 0
    out = tmp_path / "exported"
    assert (
        main(["export", *argv, "--format", "safetensors", "--dtype", "f16", "--out", str(out)]) == 0
    )
    merged, exported = tensors(tmp_path / "merged"), tensors(out)
    assert merged.keys() == exported.keys() and (out / "tokenizer.json").is_file()
    assert all(exported[k].dtype == torch.float16 for k in merged)
    assert all(torch.equal(exported[k], v.to(torch.float16)) for k, v in merged.items())
    if importlib.util.find_spec("gguf") is not None:
        gguf = tmp_path / "model.gguf"
        assert main(["export", *argv, "--format", "gguf", "--out", str(gguf)]) == 0
        assert gguf.stat().st_size > 0


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_gguf_of_the_streamed_merge_has_the_in_memory_bytes(dtype, base, tmp_path):
    pytest.importorskip("gguf")
    from slimtune.export.gguf import export_gguf

    peft_adapter(base, tmp_path / "adapter", CASES["dora"])
    model, tokenizer = merged_model(str(base), tmp_path / "adapter")
    memory = export_gguf(model.float(), tokenizer, tmp_path / "memory.gguf", dtype=dtype)
    plan = streamed_merge(str(base), tmp_path / "adapter")
    streamed = export_gguf(plan, plan.tokenizer, tmp_path / "streamed.gguf", dtype=dtype)
    assert streamed.read_bytes() == memory.read_bytes()


def test_prompt_tuning_keeps_the_in_memory_path(base, tmp_path):
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    peft_adapter(base, tmp_path / "adapter", config)
    assert streamed_merge(str(base), tmp_path / "adapter") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_on_the_gpu_within_float32_rounding(method, base, tmp_path):
    reference_model = peft_adapter(base, tmp_path / "adapter", CASES[method])
    plan = streamed_merge(str(base), tmp_path / "adapter")
    assert plan.device.type == "cuda"
    assert all(
        p.is_cuda
        for layer in plan.layers.values()
        for n, p in layer.named_parameters()
        if "base_layer" not in n
    )
    reference, streamed = write_both(base, tmp_path / "adapter", tmp_path)
    expected, got = tensors(reference), tensors(streamed)
    assert list(got) == list(expected)
    for key, value in expected.items():  # cuBLAS sums B A in another order than the CPU
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6)
    assert_logits(streamed, reference_model)


def _fused_adapter(model, out: Path) -> None:
    """slimtune's fused-QKV LoRA (loralib's MergedLinear) on GPT-2's c_attn, Q and V only."""
    config = st.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                           enable_lora={"c_attn": [True, False, True]})  # fmt: skip
    st.add_adapter(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    st.save_adapter(model, out)


@pytest.mark.parametrize("method", ["lora", "ia3", "dora", "fused"])
def test_gpt2_conv1d_biases_and_fused_qkv(method, tmp_path):
    """Conv1D weights stored (in, out), biases (IA3 scales an output-scaled layer's bias)."""
    from tiny_models import tiny_gpt2

    base = tmp_path / "base"
    tiny_gpt2().save_pretrained(base, max_shard_size="20KB")
    build_bpe_tokenizer().save_pretrained(base)
    common = dict(fan_in_fan_out=True)
    configs = {
        "lora": peft.LoraConfig(target_modules=["c_attn", "c_fc"], r=4, init_lora_weights=False, **common),
        "ia3": peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                              init_ia3_weights=False, **common),
        "dora": peft.LoraConfig(target_modules=["c_fc"], r=4, use_dora=True, init_lora_weights=False, **common),
    }  # fmt: skip
    if method == "fused":
        _fused_adapter(tiny_gpt2(), tmp_path / "adapter")
    else:
        peft_adapter(base, tmp_path / "adapter", configs[method])
    reference, streamed = write_both(base, tmp_path / "adapter", tmp_path)
    assert_same_directory(reference, streamed)


def test_sequence_classification_with_its_trained_head(tmp_path):
    """task_type SEQ_CLS: AutoModelForSequenceClassification, PEFT's own `score` copy saved."""
    from transformers import LlamaForSequenceClassification

    tokenizer = build_bpe_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    base = tmp_path / "base"
    LlamaForSequenceClassification(config).save_pretrained(base, max_shard_size=SHARD)
    tokenizer.save_pretrained(base)
    config = peft.LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"], r=2,
                             init_lora_weights=False)  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(torch.randn_like(p))
        peft_model.save_pretrained(tmp_path / "adapter")
    reference, streamed = write_both(base, tmp_path / "adapter", tmp_path)
    assert_same_directory(reference, streamed)
    assert not torch.equal(tensors(streamed)["score.weight"], tensors(base)["score.weight"])
