"""fast.py: the fused LoRA / QLoRA autograd functions against plain autograd."""

import pytest
import torch

from slimtune.kernels import lora as fast
from slimtune.quant.nf4 import quantize_4bit_state


def _reference(x, w, bias, a, b, s):
    """Hand-written LoRA forward; autograd differentiates it."""
    y = x @ w.t() + s * (x @ a.t()) @ b.t()
    return y if bias is None else y + bias


def _inputs(shape, d_in, d_out, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d_in, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dtype)
    a = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(dtype).requires_grad_(True)
    b = torch.randn(d_out, r, generator=g).to(dtype).requires_grad_(True)
    return x, w, a, b


def _grads(y, tensors, seed):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    return torch.autograd.grad(y, tensors, g)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape,d_in,d_out,r", [((2, 5), 32, 48, 4), ((7,), 64, 16, 8)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lora_linear_matches_autograd(dtype, tol, shape, d_in, d_out, r, with_bias):
    x, w, a, b = _inputs(shape, d_in, d_out, r, dtype, seed=d_in + r)
    bias = torch.randn(d_out).to(dtype).requires_grad_(True) if with_bias else None
    ref = _reference(x.double(), w.double(), None if bias is None else bias.double(),
                     a.double(), b.double(), 0.5)  # fmt: skip
    y = fast.lora_linear(x, w, bias, a, b, 0.5)
    assert y.dtype == dtype and _rel(y, ref) < tol
    leaves = [x, a, b] + ([bias] if with_bias else [])
    got = _grads(y, leaves, seed=1)
    want = _grads(ref, leaves, seed=1)
    for g, h in zip(got, want, strict=True):
        assert g.dtype == dtype and _rel(g, h) < tol


def test_qlora_linear_dequantizes_instead_of_saving():
    x, w, a, b = _inputs((3, 4), 128, 64, 8, torch.float32, seed=3)
    state = quantize_4bit_state(w, "nf4", 64, double_quant=True)
    w_hat = state.dequantize(torch.float32)  # the weight the quantized layer computes with
    y = fast.lora_linear(x, state, None, a, b, 2.0)
    ref = _reference(x.double(), w_hat.double(), None, a.double(), b.double(), 2.0)
    assert _rel(y, ref) < 1e-5
    saved = [t for t in y.grad_fn.saved_tensors]
    assert all(t.shape != w_hat.shape for t in saved)  # no (out, in) weight kept
    for g, h in zip(_grads(y, [x, a, b], 2), _grads(ref, [x, a, b], 2), strict=True):
        assert _rel(g, h) < 1e-5


@pytest.mark.parametrize("held", [False, True])
def test_qlora_dequantizes_twice_a_step_unless_a_copy_is_held(monkeypatch, held):
    x, w, a, b = _inputs((3, 4), 128, 64, 8, torch.float32, seed=3)
    state = quantize_4bit_state(w, "nf4", 64, double_quant=True)
    w_hat = state.dequantize(torch.float32)
    calls = []
    real = fast.dequantize
    monkeypatch.setattr(fast, "dequantize", lambda st_, dt: calls.append(dt) or real(st_, dt))
    weight = fast.FrozenWeight(state, held=w_hat.clone() if held else None)
    y = fast.lora_linear(x, weight, None, a, b, 2.0)
    ref = _reference(x.double(), w_hat.double(), None, a.double(), b.double(), 2.0)
    assert _rel(y, ref) < 1e-5
    for g, h in zip(_grads(y, [x, a, b], 2), _grads(ref, [x, a, b], 2), strict=True):
        assert _rel(g, h) < 1e-5
    assert len(calls) == (0 if held else 2)  # forward and backward, or the held copy


def test_a_frozen_weight_dequantizes_in_the_asked_dtype_and_ignores_a_copy_in_another():
    _, w, _, _ = _inputs((1,), 64, 32, 1, torch.float32, seed=6)
    state = quantize_4bit_state(w, "nf4", 64, double_quant=True)
    weight = fast._weight_fn(state)  # what the fused functions get outside the memory plan
    got = weight(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and weight.held is None
    assert torch.equal(got, state.dequantize(torch.bfloat16))
    held = fast.FrozenWeight(state, held=state.dequantize(torch.float32))
    assert torch.equal(held(torch.bfloat16), got)  # fp32 copy held, bf16 asked: dequantized
    assert held(torch.float32) is held.held


def test_an_unread_output_skips_the_base_gemm_and_keeps_every_gradient():
    """`unread`: y's values are left unset (nobody reads them), its gradients are exact."""
    x, w, a, b = _inputs((3, 5), 48, 40, 4, torch.float32, seed=8)
    y = fast.lora_linear(x, w, None, a, b, 0.5, unread=True)
    ref = fast.lora_linear(x, w, None, a, b, 0.5)
    assert y.shape == ref.shape == (3, 5, 40)
    for g, h in zip(_grads(y, [x, a, b], 9), _grads(ref, [x, a, b], 9), strict=True):
        assert torch.equal(g, h)


@pytest.mark.parametrize("frozen", ["a", "b"])
def test_one_frozen_factor_still_gives_the_others_gradients(frozen):
    x, w, a, b = _inputs((6,), 32, 24, 4, torch.float32, seed=10)
    (a if frozen == "a" else b).requires_grad_(False)
    trained = [x, b] if frozen == "a" else [x, a]
    y = fast.lora_linear(x, w, None, a, b, 2.0)
    ref = _reference(x.double(), w.double(), None, a.double(), b.double(), 2.0)
    for g, h in zip(_grads(y, trained, 11), _grads(ref, trained, 11), strict=True):
        assert _rel(g, h) < 1e-5


def test_frozen_linear_matches_functional_linear():
    x, w, _, _ = _inputs((2, 3), 64, 32, 1, torch.float32, seed=4)
    state = quantize_4bit_state(w, "nf4", 64, double_quant=False)
    w_hat, bias = state.dequantize(torch.float32), torch.randn(32)
    y = fast.frozen_linear(x, state, bias)
    ref = torch.nn.functional.linear(x, w_hat, bias)
    assert torch.allclose(y, ref, atol=1e-6)
    (gx,) = _grads(y, [x], 5)
    (rx,) = _grads(ref, [x], 5)
    assert torch.allclose(gx, rx, atol=1e-5)


def test_use_fast_is_false_on_cpu():
    assert not fast.use_fast(torch.zeros(1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("t,d_in,d_out,r", [(4096, 4096, 1024, 16), (300, 1000, 2048, 8)])
def test_lora_linear_gpu(quantized, t, d_in, d_out, r):
    assert fast.use_fast(torch.zeros(1, device="cuda"))
    x, w, a, b = _inputs((t,), d_in, d_out, r, torch.bfloat16, seed=t + r)
    x, a, b = (v.detach().cuda().requires_grad_(True) for v in (x, a, b))
    w = w.cuda()
    weight = quantize_4bit_state(w, "nf4", 64, double_quant=True) if quantized else w
    w_ref = weight.dequantize(torch.bfloat16) if quantized else w
    y = fast.lora_linear(x, weight, None, a, b, 2.0)
    ref = _reference(x.double(), w_ref.double(), None, a.double(), b.double(), 2.0)
    assert _rel(y, ref) < 1e-2
    for g, h in zip(_grads(y, [x, a, b], 7), _grads(ref, [x, a, b], 7), strict=True):
        assert _rel(g, h) < 1e-2


def test_lora_layer_takes_the_fused_path_when_enabled(monkeypatch):
    """LoraLinear's fused path (forced on, on CPU) gives the plain path's outputs and grads."""
    import slimtune as st

    base = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))
    torch.manual_seed(0)
    model = st.add_adapter(base, st.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # non-zero B so both terms count
    x = torch.randn(5, 32)
    results = []
    for forced in (False, True):
        monkeypatch.setattr(fast, "use_fast", lambda t, forced=forced: forced)
        y = model(x)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(y.square().sum(), params)
        is_fused = type(y.grad_fn).__name__ == "_FusedLoraLinearBackward"
        results.append((y, grads, is_fused))
    assert not results[0][2] and results[1][2]
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for g, h in zip(results[0][1], results[1][1], strict=True):
        assert torch.allclose(g, h, atol=1e-5)


def test_fused_path_under_autocast_matches_plain_autocast(monkeypatch):
    """An fp32 model under bf16 autocast (the trainer's GPU setting), CPU autocast here."""
    import slimtune as st

    torch.manual_seed(1)
    base = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
    model = st.add_adapter(base, st.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"]))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(6, 64)
    results = []
    for forced in (False, True):
        monkeypatch.setattr(fast, "use_fast", lambda t, forced=forced: forced)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(y.float().square().sum(), params)
        results.append((y, grads))
    (y0, g0), (y1, g1) = results
    assert y1.dtype == y0.dtype == torch.bfloat16
    assert _rel(y1, y0) < 1e-2
    for g, h in zip(g1, g0, strict=True):
        assert g.dtype == torch.float32 and _rel(g, h) < 2e-2
