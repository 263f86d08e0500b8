"""Loading (and writing) transformers checkpoints saved by bitsandbytes in 4-bit, without it."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import slimtune as st
from slimtune.quant.bnb_checkpoint import bnb_4bit_state_dict, load_bnb_4bit
from slimtune.quant.linear import QuantLinear, quantization_of

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")
from bitsandbytes.backends.default import ops as bnb_default  # noqa: E402


def _bnb_dequantized(layer) -> torch.Tensor:
    """A bnb Linear4bit's weight through bnb's own pure-torch dequantizer."""
    state = layer.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    compute = bnb_default._dequantize_4bit_compute.__wrapped__
    return compute(
        layer.weight.data.reshape(-1), absmax, state.code, state.blocksize, state.shape, state.dtype
    )


@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory):
    """A tiny Llama saved by transformers + bitsandbytes in NF4 with double quantization."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from conftest import build_tiny_llama_dir

    source = build_tiny_llama_dir(
        tmp_path_factory.mktemp("fp32"), hidden_size=64, intermediate_size=160
    )
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    quantized = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=config, device_map="cpu", dtype=torch.float32
    )
    target = tmp_path_factory.mktemp("bnb4")
    quantized.save_pretrained(target)
    return source, target, quantized


def _skeleton(directory):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    del config.quantization_config
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_transformers_bnb_checkpoint_loads_bit_identical(bnb_checkpoint):
    source, target, bnb_model = bnb_checkpoint
    model = load_bnb_4bit(_skeleton(target), load_file(target / "model.safetensors"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    bnb_layers = {n: m for n, m in bnb_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert sorted(layers) == sorted(bnb_layers) and len(layers) == 14
    for name, layer in layers.items():
        ours = layer.dequantize_weight(torch.float32)
        assert torch.equal(
            ours.view(torch.int32), _bnb_dequantized(bnb_layers[name]).view(torch.int32)
        )
    assert quantization_of(model)["quant"] == "nf4" and quantization_of(model)["double_quant"]
    # the same as quantizing the original weights ourselves: identical logits
    from transformers import AutoModelForCausalLM

    ours = st.quantize_model(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32))
    ids = torch.randint(0, 90, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours(ids).logits)


def test_written_state_dict_equals_bitsandbytes_file(bnb_checkpoint):
    source, target, _ = bnb_checkpoint
    from transformers import AutoModelForCausalLM

    ours = st.quantize_model(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32))
    written = bnb_4bit_state_dict(ours)
    theirs = load_file(target / "model.safetensors")
    written.pop("lm_head.weight", None)  # tied to the embeddings: transformers leaves it out
    assert sorted(written) == sorted(theirs)
    for key, value in theirs.items():
        assert value.dtype == written[key].dtype and torch.equal(value, written[key]), key


@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
def test_linear4bit_state_dict_without_double_quant(quant_type):
    torch.manual_seed(0)
    weight = torch.randn(24, 100)
    layer = bnb.nn.Linear4bit(100, 24, bias=True, compress_statistics=False, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=False, quant_type=quant_type
    )
    layer = layer.to("cpu")  # Params4bit quantizes on its move to a device
    holder = torch.nn.Sequential(torch.nn.Linear(100, 24))
    load_bnb_4bit(holder, {f"0.{k}": v for k, v in copy.deepcopy(layer.state_dict()).items()})
    ours = holder[0].dequantize_weight(torch.float32)
    assert torch.equal(ours.view(torch.int32), _bnb_dequantized(layer).view(torch.int32))
    assert torch.equal(holder[0].bias, layer.bias.detach())
