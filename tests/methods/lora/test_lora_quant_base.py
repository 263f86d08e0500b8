"""LoRA merged into a quantized base: the base becomes a plain Linear holding the dequantized
weight (computed here with the quantized layer's own dequantize, in float32 and in the
original dtype) plus scaling · B A; a base with no weight at all is refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimtune as st
from slimtune.errors import SlimtuneError
from slimtune.methods.lora.layers import LoraLinear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_into_a_quantized_base_uses_its_dequantized_weight(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).to(dtype)
    st.quantize_model(model, "nf4", skip=[])
    quantized = model[0]
    w32 = quantized.dequantize_weight(torch.float32)  # (out, in)
    config = st.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False)
    st.add_adapter(model, config)
    layer = model[0]
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    layer.merge(["default"])
    assert isinstance(layer.base_layer, nn.Linear) and layer.base_layer.weight.dtype == dtype
    # the base held in its own dtype, then W0 + s · B A in float32 (merge_weight's rule)
    expected = (w32.to(dtype).float() + 2.0 * b.float() @ a.float()).to(dtype)
    torch.testing.assert_close(layer.base_layer.weight.data, expected, rtol=0, atol=0)
    assert not layer.base_layer.weight.requires_grad


class NoWeight(nn.Module):
    in_features, out_features = 4, 3

    def forward(self, x):
        return x[..., :3]


def test_a_base_without_a_weight_is_refused_by_name():
    layer = LoraLinear(NoWeight())
    layer.add_adapter("default", 2, 2.0)
    with pytest.raises(SlimtuneError, match="^NoWeight has no weight that LoRA can use$"):
        layer.merge(["default"])
