"""LoftQ through add_adapter at α ≠ r: the layer's s · B A (s = α / r = 4) must be the best
rank-r fit of W - Q(W) (Eckart–Young, from torch's own singular values). An init that
ignored the scaling would give A and B for s = 1, and s · B A four times too large."""

from __future__ import annotations

import copy

import pytest
import torch

import slimtune as st


@pytest.mark.parametrize(("r", "alpha"), [(4, 16.0), (2, 1.0)])
def test_loftq_init_uses_the_adapters_scaling(tiny_llama, r, alpha):
    model, _ = tiny_llama
    w = copy.deepcopy(model.model.layers[0].self_attn.q_proj.weight.data)  # (out, in)
    plain = st.quant.quantize(w, "nf4").dequantize(torch.float32)
    config = st.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj"],
                           init_lora_weights="loftq")  # fmt: skip
    st.add_adapter(model, config)
    layer = model.model.layers[0].self_attn.q_proj
    scaling = alpha / r
    assert layer.scaling["default"] == scaling
    q = layer.base_layer.weight.data
    a, b = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    torch.testing.assert_close(q, plain)  # one LoftQ step: the base is Q(W), as QLoRA's
    error = (w - q - scaling * b @ a).norm()
    tail = torch.linalg.svdvals(w - plain)[r:].square().sum().sqrt()  # the best rank-r fit
    torch.testing.assert_close(error, tail, rtol=1e-3, atol=1e-6)
    assert error < (w - plain).norm()
