"""Sibling LoRA projections computed together (kernels/lora_group.py), against plain PyTorch.

q/k/v (or gate/up) adapters on one input give the outputs and the gradients (input, every A
and B, a trainable bias) that separate LoRA layers give, in float64 arithmetic as the
reference; with different ranks and scales per sibling, a 4-bit base, a sibling called with
another input, and through a whole Llama with the fused path forced on the CPU.
"""

from __future__ import annotations

import pytest
import torch

import slimtune as st
from slimtune.kernels import lora as fused
from slimtune.kernels.lora_group import Siblings, link_siblings
from slimtune.quant.nf4 import quantize_4bit_state
from tiny_models import logits_and_grads, lora_everywhere


@pytest.fixture
def fused_forced(monkeypatch):
    monkeypatch.setattr(fused, "use_fast", lambda t: True)


def _siblings(quantized: bool = False):
    """q (r 4, s 2), k (r 2, s 0.5, trainable bias), v (r 8, s 1) on a 24-wide input."""
    torch.manual_seed(0)
    base = torch.nn.ModuleDict(
        {"q": torch.nn.Linear(24, 24, bias=False), "k": torch.nn.Linear(24, 8),
         "v": torch.nn.Linear(24, 8, bias=False)}
    )  # fmt: skip
    layers = {}
    for name, (r, alpha) in {"q": (4, 8), "k": (2, 1), "v": (8, 8)}.items():
        wrapped = st.add_adapter(
            torch.nn.Sequential(base[name]),
            st.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"]),
        )
        layer = wrapped.get_submodule("0")
        for n, p in layer.named_parameters():
            if "lora_" in n:
                torch.nn.init.normal_(p, std=0.2)
        layers[name] = layer
    layers["k"].base_layer.bias.requires_grad_(True)
    if quantized:
        layers["q"].base_layer.quant_state = quantize_4bit_state(
            layers["q"].base_layer.weight.data, "nf4", 8, double_quant=False
        )
    return layers


def _reference(layers, x):
    """y = x W0ᵀ + b + s (x Aᵀ) Bᵀ per layer, in float64."""
    outs = []
    for layer in layers.values():
        base = layer.base_layer
        state = getattr(base, "quant_state", None)
        w = state.dequantize(torch.float32) if state is not None else base.weight
        (name,) = layer.active_adapters
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        y = (
            x.double() @ w.double().t()
            + layer.scaling[name] * (x.double() @ a.double().t()) @ b.double().t()
        )
        if base.bias is not None:
            y = y + base.bias.double()
        outs.append(y)
    return outs


def _grads(outs, leaves):
    torch.manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, dtype=torch.float64)).sum() for o in outs)
    return torch.autograd.grad(loss, leaves)


def _leaves(layers, x):
    params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    return [x, *params]


@pytest.mark.parametrize("quantized", [False, True])
def test_siblings_match_separate_layers_in_float64(quantized, fused_forced):
    layers = _siblings(quantized)
    if quantized:  # the fused path reads the 4-bit state: `frozen_weight` finds it
        layers["q"].base_layer.weight = None
    group = Siblings(list(layers.values()))
    x = torch.randn(2, 5, 24, requires_grad=True)
    outs = [group.forward(layer, x) for layer in layers.values()]
    assert all(type(o.grad_fn).__name__ == "_FusedLoraGroupBackward" for o in outs)
    assert outs[0].grad_fn is outs[2].grad_fn  # one node computed all three
    want = _reference(layers, x)
    for got, ref in zip(outs, want, strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    leaves = _leaves(layers, x)
    for got, ref in zip(_grads(outs, leaves), _grads(want, leaves), strict=True):
        torch.testing.assert_close(got.double(), ref.double(), rtol=1e-5, atol=1e-5)


def test_a_4bit_sibling_with_a_held_copy_is_not_dequantized(fused_forced, monkeypatch):
    """With the copy the memory plan holds on the base layer, no step dequantizes."""
    layers = _siblings(quantized=True)
    base = layers["q"].base_layer
    base.weight = None
    base.dequantized = base.quant_state.dequantize(torch.float32)
    calls = []
    real = fused.dequantize
    monkeypatch.setattr(fused, "dequantize", lambda s, d: calls.append(d) or real(s, d))
    group = Siblings(list(layers.values()))
    x = torch.randn(2, 5, 24, requires_grad=True)
    outs = [group.forward(layer, x) for layer in layers.values()]
    leaves = _leaves(layers, x)
    got = _grads(outs, leaves)
    assert calls == []
    for g, ref in zip(got, _grads(_reference(layers, x), leaves), strict=True):
        torch.testing.assert_close(g.double(), ref.double(), rtol=1e-5, atol=1e-5)


def test_a_sibling_called_with_another_input_runs_alone(fused_forced):
    layers = _siblings()
    assert link_siblings(list(layers.values()))
    x, other = torch.randn(3, 24), torch.randn(3, 24)
    q = layers["q"](x)
    k = layers["k"](other)  # not the input q was computed with: its own computation
    v = layers["v"](x)  # the pending output was dropped by k's call: v runs again, alone
    assert type(k.grad_fn).__name__ == type(v.grad_fn).__name__ == "_FusedLoraLinearBackward"
    want_q, _, want_v = _reference(layers, x)
    _, want_k, _ = _reference(layers, other)
    for got, ref in ((q, want_q), (k, want_k), (v, want_v)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_a_whole_llama_gives_the_same_logits_and_gradients_linked_or_not(tiny_llama, fused_forced):
    model = lora_everywhere(tiny_llama[0], b_std=0.1)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    logits, grads = logits_and_grads(model, ids)
    attention = model.model.layers[0].self_attn
    for layer in model.model.layers:
        assert link_siblings(
            [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
        )
        assert link_siblings([layer.mlp.gate_proj, layer.mlp.up_proj])
    linked_logits, linked_grads = logits_and_grads(model, ids)
    assert attention.k_proj.lora_siblings.pending is None  # every pending output was taken
    torch.testing.assert_close(linked_logits, logits, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(linked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_only_plain_lora_layers_are_linked(tiny_llama):
    """DoRA computes more than x W0ᵀ + s (x Aᵀ) Bᵀ: its layers never join a sibling group."""
    model, _ = tiny_llama
    dora = st.add_adapter(
        model, st.LoraConfig(r=2, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj"])
    )
    attention = dora.model.layers[0].self_attn
    assert not link_siblings([attention.q_proj, attention.k_proj, attention.v_proj])
    assert not hasattr(attention.q_proj, "lora_siblings")
