"""LoRA layers and math (slimtune.lora) against hand-written torch and PEFT's layers."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.lora.layers import (
    LoraEmbedding,
    LoraFusedLinear,
    LoraLinear,
    block_diagonal_b,
    init_lora_,
    lora_scaling,
    merge_weight,
    pissa_init,
    unmerge_weight,
)


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def _peft_layer(base: nn.Module, **lora_kwargs) -> nn.Module:
    """PEFT's own LoRA layer around a copy of `base` (built through get_peft_model)."""
    import peft

    config = peft.LoraConfig(target_modules=["layer"], **lora_kwargs)
    return peft.get_peft_model(_Holder(copy.deepcopy(base)), config).base_model.model.layer


def _linear(n_in: int = 12, n_out: int = 10, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def test_scaling_plain_and_rslora():
    assert lora_scaling(16, 4) == 16 / 4
    assert lora_scaling(16, 4, use_rslora=True) == 16 / 4**0.5


def test_linear_forward_and_gradients_match_hand_computation():
    base = _linear()
    layer = LoraLinear(copy.deepcopy(base))
    layer.add_adapter("default", 3, 6.0, init=False)
    layer.set_adapter(["default"])
    a = layer.lora_A["default"].weight.detach()  # (r, in)
    b = layer.lora_B["default"].weight.detach()  # (out, r)
    s = 6.0 / 3
    x = torch.randn(2, 5, 12)
    g = torch.randn(2, 5, 10)
    h = layer(x)
    torch.testing.assert_close(h, base(x) + s * (x @ a.T) @ b.T, rtol=0, atol=1e-6)
    (h * g).sum().backward()
    xf, gf = x.reshape(-1, 12), g.reshape(-1, 10)
    g_b = s * gf.T @ (xf @ a.T)  # s · g · (A x)ᵀ summed over tokens
    g_a = s * (gf @ b).T @ xf  # s · Bᵀ g · xᵀ
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, g_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, g_a, rtol=1e-5, atol=1e-5)
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


def test_linear_matches_peft_layer_with_dropout_in_train_mode():
    base = _linear()
    ours = LoraLinear(copy.deepcopy(base))
    ours.add_adapter("default", 4, 8.0, dropout=0.3, init=False)
    ours.set_adapter(["default"])
    theirs = _peft_layer(base, r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False)
    theirs.lora_A["default"].weight.data = ours.lora_A["default"].weight.data.clone()
    theirs.lora_B["default"].weight.data = ours.lora_B["default"].weight.data.clone()
    x = torch.randn(3, 12)
    torch.manual_seed(7)
    out_ours = ours(x)
    torch.manual_seed(7)
    out_theirs = theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=0, atol=1e-6)


def test_merge_unmerge_round_trip_and_errors():
    layer = LoraLinear(_linear())
    layer.add_adapter("default", 2, 4.0, init=False)
    layer.set_adapter(["default"])
    x = torch.randn(4, 12)
    w0 = layer.base_layer.weight.detach().clone()
    expected = layer(x)
    layer.merge(["default"])
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    with pytest.raises(SlimtuneError, match="already merged"):
        layer.merge(["default"])
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    assert merge_weight(w0.half(), torch.ones(10, 12)).dtype == torch.float16
    torch.testing.assert_close(unmerge_weight(merge_weight(w0, w0), w0), w0)


def test_conv1d_fan_in_fan_out_matches_peft():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(10, 12)  # weight (in=12, out=10)
    ours = LoraLinear(copy.deepcopy(conv))
    assert ours.fan_in_fan_out and (ours.in_features, ours.out_features) == (12, 10)
    ours.add_adapter("default", 3, 3.0, init=False)
    ours.set_adapter(["default"])
    theirs = _peft_layer(conv, r=3, lora_alpha=3, fan_in_fan_out=True, init_lora_weights=False)
    theirs.lora_A["default"].weight.data = ours.lora_A["default"].weight.data.clone()
    theirs.lora_B["default"].weight.data = ours.lora_B["default"].weight.data.clone()
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
    ours.merge(["default"])
    theirs.merge()
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, rtol=0, atol=1e-6)


def test_fused_layer_leaves_disabled_slice_exactly_unchanged():
    base = _linear(12, 3 * 8)
    layer = LoraFusedLinear(copy.deepcopy(base), [True, False, True])
    layer.add_adapter("default", 2, 4.0, init=False)
    layer.set_adapter(["default"])
    assert layer.lora_A["default"].weight.shape == (2 * 2, 12)
    assert layer.lora_B["default"].weight.shape == (2 * 8, 2)
    x = torch.randn(5, 12)
    out, ref = layer(x), base(x)
    assert torch.equal(out[:, 8:16], ref[:, 8:16])  # K slice: bit-identical
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    s = 4.0 / 2
    torch.testing.assert_close(
        out[:, :8], ref[:, :8] + s * (x @ a[:2].T) @ b[:8].T, rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        out[:, 16:], ref[:, 16:] + s * (x @ a[2:].T) @ b[8:].T, rtol=0, atol=1e-6
    )
    layer.merge(["default"])
    torch.testing.assert_close(layer(x), out, rtol=0, atol=1e-5)
    assert torch.equal(layer.base_layer.weight[8:16], base.weight[8:16])


def test_block_diagonal_b_layout():
    b = torch.arange(8.0).reshape(4, 2)  # two enabled slices of size 2, rank 2
    full = block_diagonal_b(b, [True, False, True], [2, 2, 2], 2)
    expected = torch.zeros(6, 4)
    expected[0:2, 0:2] = b[0:2]
    expected[4:6, 2:4] = b[2:4]
    assert torch.equal(full, expected)


def test_fused_layer_gradients_reach_only_enabled_slices():
    layer = LoraFusedLinear(_linear(12, 24), [True, False, True])
    layer.add_adapter("default", 2, 2.0, init=False)
    layer.set_adapter(["default"])
    x, g = torch.randn(6, 12), torch.randn(6, 24)
    (layer(x) * g).sum().backward()
    a = layer.lora_A["default"].weight.detach()
    b = layer.lora_B["default"].weight.detach()
    s = 1.0
    g_b = torch.cat([s * g[:, :8].T @ (x @ a[:2].T), s * g[:, 16:].T @ (x @ a[2:].T)])
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, g_b, rtol=1e-5, atol=1e-5)
    g_a = torch.cat([s * (g[:, :8] @ b[:8]).T @ x, s * (g[:, 16:] @ b[8:]).T @ x])
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, g_a, rtol=1e-5, atol=1e-5)


def test_embedding_matches_peft_layer():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, padding_idx=0)
    ours = LoraEmbedding(copy.deepcopy(emb))
    ours.add_adapter("default", 3, 6.0, init=False)
    ours.set_adapter(["default"])
    theirs = _peft_layer(emb, r=3, lora_alpha=6, init_lora_weights=False)
    theirs.lora_embedding_A["default"].data = ours.lora_embedding_A["default"].data.clone()
    theirs.lora_embedding_B["default"].data = ours.lora_embedding_B["default"].data.clone()
    x = torch.randint(0, 20, (2, 7))
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
    ours.merge(["default"])
    theirs.merge()
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, rtol=0, atol=1e-6)


def test_default_init_is_identity_and_gaussian_init_as_peft():
    layer = LoraLinear(_linear())
    layer.add_adapter("default", 4, 8.0)
    layer.set_adapter(["default"])
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), layer.base_layer(x))
    gauss = LoraLinear(_linear())
    torch.manual_seed(1)
    gauss.add_adapter("g", 4, 8.0, init="gaussian")
    assert torch.count_nonzero(gauss.lora_B["g"].weight) == 0
    assert 0.15 < gauss.lora_A["g"].weight.std().item() < 0.35  # std 1/r = 0.25
    theirs = _peft_layer(_linear(), r=4, lora_alpha=8, init_lora_weights="gaussian")
    torch.manual_seed(2)
    theirs.reset_lora_parameters("default", "gaussian")  # PEFT's own init, same random draws
    torch.manual_seed(2)
    with torch.no_grad():  # the function add_adapter initialises with
        init_lora_(gauss.lora_A["g"].weight, gauss.lora_B["g"].weight, "gaussian", 4)
    torch.testing.assert_close(gauss.lora_A["g"].weight, theirs.lora_A["default"].weight)
    torch.testing.assert_close(gauss.lora_B["g"].weight, theirs.lora_B["default"].weight)


def test_pissa_keeps_model_unchanged_and_matches_peft():
    base = _linear(12, 10)
    x = torch.randn(3, 12)
    layer = LoraLinear(copy.deepcopy(base))
    layer.add_adapter("default", 4, 8.0, init="pissa")
    layer.set_adapter(["default"])
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-5)
    theirs = _peft_layer(base, r=4, lora_alpha=8, init_lora_weights="pissa")
    torch.testing.assert_close(
        layer.lora_A["default"].weight, theirs.lora_A["default"].weight, rtol=0, atol=1e-5
    )
    torch.testing.assert_close(layer.base_layer.weight, theirs.base_layer.weight, rtol=0, atol=1e-5)
    a, b, res = pissa_init(base.weight, 4, 2.0)
    torch.testing.assert_close(res + 2.0 * b @ a, base.weight, rtol=0, atol=1e-5)


def test_loftq_without_helper_or_on_embedding_is_an_error():
    emb = LoraEmbedding(nn.Embedding(5, 3))
    with pytest.raises(SlimtuneError, match="loftq"):
        emb.add_adapter("default", 2, 2.0, init="loftq")
    with pytest.raises(SlimtuneError, match="equal slices"):
        LoraFusedLinear(_linear(12, 10), [True, False, True])


def test_pissa_and_loftq_are_refused_before_a_layer_without_a_dense_weight_changes():
    layers = {
        "an Embedding layer": LoraEmbedding(nn.Embedding(5, 3)),
        "a fused layer with enable_lora": LoraFusedLinear(_linear(12, 24), [True, False, True]),
    }
    for kind, layer in layers.items():
        for init in ("pissa", "loftq"):
            message = f"init_lora_weights={init!r} is not available for {kind}"
            with pytest.raises(SlimtuneError, match=re.escape(message)):
                layer.add_adapter("default", 2, 2.0, init=init)
            assert layer.r == {} and layer._adapter_modules("default") == []
        layer.add_adapter("default", 2, 2.0)  # the name is still free
        assert layer.r == {"default": 2}


def test_default_init_draws_the_same_a_as_peft():
    """Kaiming-uniform with a = √5 (bound 1/√in), from the same random draws as PEFT's."""
    theirs = _peft_layer(_linear(n_in=256, n_out=64), r=16, lora_alpha=16)
    torch.manual_seed(3)
    theirs.reset_lora_parameters("default", True)
    a, b = torch.empty(16, 256), torch.full((64, 16), 7.0)
    torch.manual_seed(3)
    init_lora_(a, b, True, 16)
    assert torch.equal(a, theirs.lora_A["default"].weight.detach())
    assert torch.count_nonzero(b) == 0


def test_no_init_draws_both_matrices_as_nn_linear_does():
    """init=False: A and B as fresh nn.Linear weights (what PEFT leaves when not initialising)."""
    torch.manual_seed(4)
    want_a = nn.Linear(256, 16, bias=False).weight.detach()
    want_b = nn.Linear(16, 64, bias=False).weight.detach()
    a, b = torch.empty(16, 256), torch.empty(64, 16)
    torch.manual_seed(4)
    init_lora_(a, b, False, 16)
    assert torch.equal(a, want_a) and torch.equal(b, want_b)


def test_unmerge_returns_the_weight_in_its_own_dtype():
    w = torch.randn(8, 6).to(torch.bfloat16)
    delta = torch.randn(8, 6) * 1e-2
    merged = merge_weight(w, delta)
    back = unmerge_weight(merged, delta)
    assert merged.dtype == back.dtype == torch.bfloat16
    torch.testing.assert_close(back, w, rtol=0, atol=2e-2)


def test_a_bf16_base_with_fp32_adapters_adds_in_fp32_and_returns_bf16():
    """How a GPU run holds them: the low-rank term is computed in the adapters' fp32."""
    from slimtune.methods.lora.layers import _add_lora

    torch.manual_seed(5)
    result = torch.randn(3, 10).to(torch.bfloat16)
    x = torch.randn(3, 12).to(torch.bfloat16)
    a, b = torch.randn(4, 12), torch.randn(10, 4)
    got = _add_lora(result, x, a, b, 0.5)
    want = result.float() + 0.5 * (x.float() @ a.t()) @ b.t()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=2e-2)


def test_a_layer_without_both_feature_counts_is_refused_by_name():
    class HalfLinear(nn.Module):
        in_features = 4  # no out_features

    with pytest.raises(SlimtuneError, match="LoRA cannot wrap HalfLinear"):
        LoraLinear(HalfLinear())


def test_wraps_any_linear_like_module_such_as_a_quantized_base():
    class FrozenLinear(nn.Module):  # the QuantLinear contract: features, dequantize_weight, forward
        def __init__(self, w: torch.Tensor) -> None:
            super().__init__()
            self.in_features, self.out_features = w.shape[1], w.shape[0]
            self.register_buffer("w", w)

        def dequantize_weight(self, dtype: torch.dtype) -> torch.Tensor:
            return self.w.to(dtype)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w.T

    w = torch.randn(10, 12)
    layer = LoraLinear(FrozenLinear(w))
    layer.add_adapter("default", 2, 2.0, init=False)
    layer.set_adapter(["default"])
    x = torch.randn(3, 12)
    out = layer(x)
    layer.merge(["default"])  # the base becomes an nn.Linear holding W + ΔW
    assert isinstance(layer.base_layer, nn.Linear)
    torch.testing.assert_close(layer.base_layer(x), out, rtol=0, atol=1e-5)
