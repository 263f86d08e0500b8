"""QuantLinear and quantize_model, checked against bitsandbytes and hand-written torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimtune as st
from slimtune.errors import SlimtuneError
from slimtune.quant.linear import QuantLinear, quantization_of, quantized_layers


def _bnb_weight(w: torch.Tensor, quant_type: str = "nf4") -> torch.Tensor:
    """bitsandbytes' dequantized weight through its pure-torch backend, which is right for
    every shape (its AVX-512 kernel mis-indexes absmax when a row is not whole blocks)."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    bnb_default = pytest.importorskip("bitsandbytes.backends.default.ops")
    packed, state = bnbf.quantize_4bit(
        w, blocksize=64, compress_statistics=True, quant_type=quant_type
    )
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    compute = bnb_default._dequantize_4bit_compute.__wrapped__
    code = bnbf.get_4bit_type(quant_type, device="cpu")
    return compute(packed.reshape(-1), absmax, code, 64, w.shape, w.dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_and_input_gradient_match_hand_computation(quant_type):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    w_hat = _bnb_weight(linear.weight.data, quant_type)
    layer = QuantLinear(st.quant.quantize(linear.weight.data, quant_type), linear.bias)
    assert (layer.in_features, layer.out_features) == (128, 48)
    assert torch.equal(layer.dequantize_weight(torch.float32), w_hat)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    expected = x.detach() @ w_hat.T + linear.bias.detach()  # (3, 5, 48)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad @ w_hat, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())


def test_a_held_dequantized_copy_is_used_in_its_dtype_only(monkeypatch):
    """The copy the memory plan holds replaces the dequantization, with the same result;
    asked for another dtype, the layer dequantizes as before."""
    import slimtune.quant.linear as linear_module

    torch.manual_seed(1)
    linear = nn.Linear(64, 32)
    layer = QuantLinear(st.quant.quantize(linear.weight.data, "nf4"), linear.bias)
    x = torch.randn(4, 64, requires_grad=True)
    want = layer(x)
    (want_dx,) = torch.autograd.grad(want.sum(), x)
    layer.dequantized = layer.dequantize_weight(torch.float32)
    calls = []
    real = linear_module._dequantize
    monkeypatch.setattr(linear_module, "_dequantize", lambda s, d: calls.append(d) or real(s, d))
    got = layer(x)
    (got_dx,) = torch.autograd.grad(got.sum(), x)
    assert calls == [] and torch.equal(got, want) and torch.equal(got_dx, want_dx)
    layer(x.detach().double())  # another dtype: dequantized for it
    assert calls == [torch.float64]
    assert "dequantized" not in layer.state_dict()


def test_int8_layer_matches_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(1)
    w = torch.randn(40, 70)
    codes, stats, _ = bnbf.int8_vectorwise_quant(w.clone())
    layer = QuantLinear(st.quant.quantize(w, "int8"), None)
    assert torch.equal(layer.codes, codes) and torch.equal(layer.absmax, stats)
    assert torch.equal(layer.dequantize_weight(), bnbf.int8_vectorwise_dequant(codes, stats))


def test_statistics_keep_their_dtype_through_model_casts():
    layer = QuantLinear(st.quant.quantize(torch.randn(64, 64), "nf4"), torch.zeros(64))
    before = layer.dequantize_weight(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.offset.dtype == torch.float32 and layer.absmax2.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize_weight(torch.float32), before)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


def test_quantize_model_replaces_linears_and_records_it(tiny_llama):
    model, _ = tiny_llama
    ids = torch.randint(0, 90, (2, 12))
    with torch.no_grad():
        reference = model(ids).logits
    assert quantization_of(model) is None
    originals = {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n != "lm_head"
    }
    st.quantize_model(model, "nf4")
    layers = quantized_layers(model)
    assert sorted(layers) == sorted(originals) and isinstance(model.lm_head, nn.Linear)
    record = quantization_of(model)
    assert record["quant"] == "nf4" and record["blocksize"] == 64 and record["double_quant"]
    for name, layer in layers.items():  # each weight is bitsandbytes' NF4 of the original
        assert torch.equal(layer.dequantize_weight(torch.float32), _bnb_weight(originals[name]))
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - reference).abs().max() < 0.5  # quantized, not broken
    assert not torch.equal(logits, reference)


def test_qlora_forward_is_dequantized_base_plus_scaled_lora(tiny_llama):
    model, _ = tiny_llama
    st.quantize_model(model, "nf4")
    config = st.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    st.add_adapter(model, config)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, QuantLinear)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(2, 7, layer.in_features)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w_hat = layer.base_layer.dequantize_weight(torch.float32)
    expected = x @ w_hat.T + 2.0 * (x @ a.T) @ b.T  # scaling = 8 / 4
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    trainable, _ = st.trainable_parameters(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    loss = model(torch.randint(0, 90, (2, 10))).logits.square().mean()
    loss.backward()
    assert layer.lora_A["default"].weight.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_quantize_model_errors():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(SlimtuneError, match="'q4'"):
        st.quantize_model(model, "q4")
    with pytest.raises(SlimtuneError, match="100"):
        st.quantize_model(model, "nf4", blocksize=100)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_layer_matches_cpu_reference_bf16():
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536)
    layer = QuantLinear(st.quant.quantize(linear.weight.data, "nf4"), linear.bias)
    reference = layer.dequantize_weight(torch.bfloat16)  # CPU torch reference
    layer.to("cuda", torch.bfloat16)  # statistics keep fp32; codes stay uint8
    assert torch.equal(layer.dequantize_weight(torch.bfloat16).cpu(), reference)
    x = torch.randn(4, 576, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    w = reference.cuda()
    torch.testing.assert_close(y, x.detach() @ w.T + layer.bias, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad, torch.ones_like(y) @ w, rtol=2e-2, atol=2e-2)
