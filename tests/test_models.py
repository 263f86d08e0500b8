"""Model argument resolution (slimtune.models): what is accepted and what is refused, in one line."""

from __future__ import annotations

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.models import load_model, model_directory, resolve_model_path


def test_a_transformers_directory_loads(tiny_llama_dir):
    model, tokenizer = load_model(tiny_llama_dir)
    assert not model.training and tokenizer.pad_token is not None
    assert next(model.parameters()).dtype == torch.float32
    assert model_directory(tiny_llama_dir) == tiny_llama_dir


def test_missing_path_is_named(tmp_path):
    with pytest.raises(SlimtuneError, match=r"does not exist.*smollm2-135m") as info:
        resolve_model_path(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SlimtuneError, match="no config.json"):
        resolve_model_path(tmp_path)


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(SlimtuneError, match=r"pickled.*safetensors") as info:
        resolve_model_path(tmp_path)
    assert "\n" not in str(info.value)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SlimtuneError, match="no .safetensors"):
        resolve_model_path(tmp_path)


def test_files_other_than_gguf_are_refused(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(SlimtuneError, match="pickled"):
        resolve_model_path(tmp_path / "w.pt")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(SlimtuneError, match="not a .gguf"):
        resolve_model_path(tmp_path / "w.txt")


def test_unloadable_directory_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SlimtuneError, match="cannot load"):
        load_model(tmp_path)


# ------------------------------------------------------------------ streamed loading


def _sharded_copy(source, target, dtype=torch.float32):
    """A copy of `source` saved by transformers in several shards (an index file)."""
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.save_pretrained(target, max_shard_size="30KB")
    for path in source.iterdir():
        if "token" in path.name:
            shutil.copy(path, target)
    return target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
def test_streamed_sharded_directory_equals_from_pretrained(
    make_tiny_llama_dir, tmp_path, dtype, tied
):
    from transformers import AutoModelForCausalLM

    from slimtune.weights import streamed_model

    source = make_tiny_llama_dir(tie_word_embeddings=tied)
    sharded = _sharded_copy(source, tmp_path / "sharded")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    reference = AutoModelForCausalLM.from_pretrained(sharded, dtype=dtype)
    streamed = streamed_model(sharded, dtype, torch.device("cpu"))
    want, got = reference.state_dict(), streamed.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert not any(p.is_meta for p in streamed.parameters())
    assert (streamed.lm_head.weight is streamed.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 90, (2, 7))
    assert torch.equal(reference(ids).logits, streamed.eval()(ids).logits)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_streamed_quantization_is_byte_identical_to_quantize_model(
    make_tiny_llama_dir, tmp_path, quant
):
    from transformers import AutoModelForCausalLM

    import slimtune as st
    from slimtune.quant.linear import quantization_of

    source = make_tiny_llama_dir(tie_word_embeddings=False)
    sharded = _sharded_copy(source, tmp_path / "sharded")
    full = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    reference = st.quantize_model(full, quant, skip=["lm_head"])
    streamed, _ = load_model(sharded, quantize=quant)
    want, got = reference.state_dict(), streamed.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert quantization_of(streamed) == quantization_of(reference)


def test_bnb_4bit_directory_streams_its_bytes_unchanged(tmp_path, make_tiny_llama_dir):
    """A transformers + bitsandbytes NF4 directory loads as it is, without bitsandbytes."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from slimtune.quant.linear import QuantLinear

    source = make_tiny_llama_dir(hidden_size=64, intermediate_size=160)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    quantized = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=config, device_map="cpu", dtype=torch.float32
    )
    target = tmp_path / "bnb4"
    quantized.save_pretrained(target)
    for path in source.iterdir():
        if "token" in path.name:
            (target / path.name).write_bytes(path.read_bytes())
    stored = load_file(target / "model.safetensors")
    model, _ = load_model(target)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        state = layer.quant_state
        assert torch.equal(state.codes, stored[f"{name}.weight"].reshape(-1))
        assert torch.equal(state.absmax, stored[f"{name}.weight.absmax"])
        assert torch.equal(state.absmax2, stored[f"{name}.weight.nested_absmax"])
        assert torch.equal(
            layer.dequantize_weight(torch.float32), _bnb_dequantized(quantized, name)
        )


def _bnb_dequantized(model, name: str) -> torch.Tensor:
    """bitsandbytes' own pure-torch dequantization of a Linear4bit's weight."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.backends.default import ops

    state = model.get_submodule(name).weight.quant_state
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    weight = model.get_submodule(name).weight.data.reshape(-1)
    compute = ops._dequantize_4bit_compute.__wrapped__
    return compute(weight, absmax, state.code, state.blocksize, state.shape, state.dtype)


def test_names_that_do_not_line_up_fall_back_to_from_pretrained(make_tiny_llama_dir):
    """A checkpoint whose names transformers would rename is not streamed (None: load plainly)."""
    from safetensors.torch import load_file, save_file

    from slimtune.weights import streamed_model

    source = make_tiny_llama_dir(tie_word_embeddings=False)
    tensors = load_file(source / "model.safetensors")
    tensors["model.final_norm.weight"] = tensors.pop("model.norm.weight")
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    assert streamed_model(source, torch.float32, torch.device("cpu")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eval_and_generate_run_on_the_gpu_with_an_adapter(make_tiny_llama_dir, tmp_path):
    """eval/generate load onto the GPU (bf16, kernels on) and score as the CPU's fp32 does."""
    import json

    import slimtune as st
    from slimtune.cli.eval import load_for_inference
    from slimtune.evaluate import evaluate, generate

    directory = make_tiny_llama_dir(hidden_size=128, intermediate_size=256)
    cpu_model, tokenizer = load_model(directory)
    torch.manual_seed(0)
    cpu_model = st.add_adapter(cpu_model, st.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in cpu_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # the adapter changes the outputs
    st.save_adapter(cpu_model, tmp_path / "adapter")
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(10)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = evaluate(cpu_model.eval(), tokenizer, data)["loss"]
    model, tokenizer = load_for_inference(str(directory), str(tmp_path / "adapter"))
    assert next(model.parameters()).is_cuda
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    got = evaluate(model, tokenizer, data)["loss"]
    assert abs(got - want) / want < 2e-2, (got, want)
    assert isinstance(generate(model, tokenizer, "1+1=", max_new_tokens=4), str)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bnb_4bit_directory_computes_as_bitsandbytes_gpu(make_tiny_llama_dir, tmp_path):
    """A *-bnb-4bit directory streamed to the GPU gives bitsandbytes' own logits."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    source = make_tiny_llama_dir(hidden_size=128, intermediate_size=256)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    reference = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=config, device_map={"": 0}, dtype=torch.bfloat16
    )
    target = tmp_path / "bnb4"
    reference.save_pretrained(target)
    for path in source.iterdir():
        if "token" in path.name:
            (target / path.name).write_bytes(path.read_bytes())
    model, _ = load_model(target, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 90, (2, 33), device="cuda")
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits.float(), model(input_ids=ids).logits.float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2
