"""A LoRA gate and up projection with their activation as one function (kernels/lora_mlp.py),
run by Triton's interpreter on the CPU, against float64 PyTorch: the output and the gradients
of x, both A and both B, with SiLU and tanh-GELU gates, different ranks and scales (one rank
below tl.dot's 16, padded), a 4-bit gate weight, and wired into a whole patched Llama."""

from __future__ import annotations

import pytest
import torch

import slimtune as st
from slimtune.kernels import llama_ops, lora_mlp
from slimtune.kernels import lora as fused
from slimtune.quant.nf4 import quantize_4bit_state
from tiny_models import logits_and_grads, lora_everywhere

pytest.importorskip("triton")


@pytest.fixture
def fused_forced(monkeypatch):
    monkeypatch.setattr(fused, "use_fast", lambda t: True)


def _mlp(quantized: bool) -> torch.nn.Module:
    """gate (r 4, alpha 8) and up (r 16, alpha 8) LoRA layers, 24 -> 40, on one module."""
    torch.manual_seed(0)
    mlp = torch.nn.Module()
    for name, (r, alpha) in {"gate_proj": (4, 8), "up_proj": (16, 8)}.items():
        wrapped = st.add_adapter(
            torch.nn.Sequential(torch.nn.Linear(24, 40, bias=False)),
            st.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"]),
        )
        layer = wrapped.get_submodule("0")
        for n, p in layer.named_parameters():
            if "lora_" in n:
                torch.nn.init.normal_(p, std=0.3)
        setattr(mlp, name, layer)
    if quantized:
        base = mlp.gate_proj.base_layer
        base.quant_state = quantize_4bit_state(base.weight.data, "nf4", 8, double_quant=False)
    return mlp


def _projection(layer, x):
    """x W0ᵀ + s (x Aᵀ) Bᵀ in float64."""
    state = getattr(layer.base_layer, "quant_state", None)
    w = state.dequantize(torch.float32) if state is not None else layer.base_layer.weight
    (name,) = layer.active_adapters
    a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
    return x @ w.double().t() + layer.scaling[name] * (x @ a.t()) @ b.t()


def _leaves(mlp, x):
    params = [p for m in (mlp.gate_proj, mlp.up_proj) for p in m.parameters() if p.requires_grad]
    return [x, *params]


@pytest.mark.parametrize("gelu", [False, True], ids=["swiglu", "geglu"])
@pytest.mark.parametrize("quantized", [False, True], ids=["bf16-base", "nf4-gate"])
def test_gated_lora_mlp_matches_float64(gelu, quantized, fused_forced):
    mlp = _mlp(quantized)
    x = torch.randn(2, 5, 24, requires_grad=True)
    h = lora_mlp.lora_gated_mlp(mlp, x, gelu)
    assert h is not None and h.shape == (2, 5, 40)
    act = (
        (lambda a: torch.nn.functional.gelu(a, approximate="tanh"))
        if gelu
        else torch.nn.functional.silu
    )
    ref = act(_projection(mlp.gate_proj, x.double())) * _projection(mlp.up_proj, x.double())
    torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-6)
    weights = torch.randn(h.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = torch.autograd.grad((h.double() * weights).sum(), _leaves(mlp, x))
    theirs = torch.autograd.grad((ref * weights).sum(), _leaves(mlp, x))
    assert len(ours) == 5  # x, A_g, B_g, A_u, B_u
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)


def test_a_bias_or_a_plain_projection_keeps_the_separate_path(fused_forced):
    mlp = _mlp(False)
    x = torch.randn(3, 24)
    mlp.up_proj.base_layer.bias = torch.nn.Parameter(torch.zeros(40), requires_grad=False)
    assert lora_mlp.lora_gated_mlp(mlp, x, False) is None
    mlp.up_proj = torch.nn.Linear(24, 40)
    assert lora_mlp.lora_gated_mlp(mlp, x, False) is None


def test_a_patched_llama_takes_the_gated_path_with_the_same_logits_and_gradients(
    tiny_llama, monkeypatch
):
    model = lora_everywhere(tiny_llama[0], b_std=0.2)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    logits, grads = logits_and_grads(model, ids)
    calls = []
    original = lora_mlp.lora_gated_mlp
    monkeypatch.setattr(llama_ops, "lora_gated_mlp", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(llama_ops, "kernels_enabled", lambda t: True)  # CPU: the interpreter
    monkeypatch.setattr(fused, "use_fast", lambda t: True)
    try:
        llama_ops.patch_llama(model)
        patched_logits, patched_grads = logits_and_grads(model, ids)
    finally:
        llama_ops.unpatch_rope()
    assert len(calls) == len(model.model.layers)
    torch.testing.assert_close(patched_logits, logits, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(patched_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_a_rebuilt_mlp_output_is_freed_and_gives_the_same_gradients(tiny_llama, monkeypatch):
    """With `rebuild_gated_outputs` no MLP keeps h through the step (the down projection keeps
    a recipe), and backward's rebuilt h gives every gradient bit for bit."""
    import gc
    import weakref

    model = lora_everywhere(tiny_llama[0], b_std=0.2)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    outputs = []
    original = lora_mlp.lora_gated_mlp

    def gated(*args):
        h = original(*args)
        outputs.append(weakref.ref(h))
        return h

    monkeypatch.setattr(llama_ops, "lora_gated_mlp", gated)
    monkeypatch.setattr(llama_ops, "kernels_enabled", lambda t: True)  # CPU: the interpreter
    monkeypatch.setattr(fused, "use_fast", lambda t: True)

    def step():
        outputs.clear()
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        gc.collect()
        alive = sum(ref() is not None for ref in outputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return alive, grads

    try:
        llama_ops.patch_llama(model)
        kept, grads = step()
        assert llama_ops.rebuild_gated_outputs(model) == len(model.model.layers)
        freed, rebuilt_grads = step()
    finally:
        llama_ops.unpatch_rope()
    assert kept == len(model.model.layers) and freed == 0
    for name, grad in grads.items():
        assert torch.equal(rebuilt_grads[name], grad), name
