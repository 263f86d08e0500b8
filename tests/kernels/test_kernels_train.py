"""fused_loss.py and checkpointing.py against plain PyTorch / transformers."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.kernels.cross_entropy import causal_lm_loss, linear_cross_entropy
from slimtune.kernels.recompute import enable_checkpointing

CUDA = torch.cuda.is_available()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ce_case(device, dtype, seed, t=37, d=24, v=101):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, d, generator=g).to(device, dtype).requires_grad_(True)
    w = (torch.randn(v, d, generator=g) / d**0.5).to(device, dtype).requires_grad_(True)
    y = torch.randint(0, v, (t,), generator=g).to(device)
    y[::5] = -100
    return h, w, y


@pytest.mark.parametrize("chunk", [8, 64])
def test_linear_cross_entropy_matches_full_logits(chunk):
    h, w, y = _ce_case("cpu", torch.float32, seed=chunk)
    loss = linear_cross_entropy(h, w, y, chunk=chunk)
    ref = torch.nn.functional.cross_entropy(h.double() @ w.double().t(), y)
    assert abs(loss.item() - ref.item()) < 1e-5
    (loss * 3).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (ref * 3).backward()
    assert _rel(gh, h.grad) < 1e-5 and _rel(gw, w.grad) < 1e-5


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg)


def test_causal_lm_loss_matches_transformers():
    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = model(input_ids=ids, labels=ids).loss
    loss = causal_lm_loss(model, ids, ids)
    assert abs(loss.item() - ref.item()) < 1e-5


@pytest.mark.parametrize("dropout,autocast", [(0.0, False), (0.3, False), (0.0, True)])
def test_checkpointing_gives_the_same_gradients(dropout, autocast):
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointed in (False, True):
        model = _tiny_llama()
        model.config.attention_dropout = dropout
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = dropout
        model.train()
        if checkpointed:
            assert enable_checkpointing(model) == 2
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g, h in zip(*grads, strict=True):
        assert torch.allclose(g, h, atol=1e-6, rtol=1e-5)  # the same bf16 recomputation


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("t,v", [(1000, 32000), (4096, 128256)])
def test_linear_cross_entropy_gpu(t, v):
    h, w, y = _ce_case("cuda", torch.bfloat16, seed=t, t=t, d=512, v=v)
    loss = linear_cross_entropy(h, w, y)
    ref = torch.nn.functional.cross_entropy((h @ w.t()).float(), y)
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-3
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref.backward()
    assert _rel(gh, h.grad) < 1e-2 and _rel(gw, w.grad) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_offloaded_checkpointing_gpu():
    ids = torch.randint(0, 97, (2, 16), device="cuda")
    grads = []
    for offload in (None, True):
        model = _tiny_llama().cuda().train()
        if offload is not None:
            enable_checkpointing(model, offload=offload)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g, h in zip(*grads, strict=True):
        assert torch.allclose(g, h, atol=1e-5, rtol=1e-4)


def test_cross_entropy_triton_rows_match_reference_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from slimtune.kernels import cross_entropy as fused_loss

    g = torch.Generator().manual_seed(9)
    z = torch.randn(6, 3000, generator=g) * 4
    y = torch.randint(0, 3000, (6,), generator=g)
    scale = torch.rand(6, generator=g)
    want_loss, want_grad = fused_loss.chunk_loss_grad(z.clone(), y, scale)
    loss, grad = fused_loss._chunk_loss_grad_triton(z.clone(), y, scale)
    assert torch.allclose(loss, want_loss, atol=1e-5)
    assert torch.allclose(grad, want_grad, atol=1e-7)
    # the whole loss through the kernel (forced on for CPU tensors) against full logits
    monkeypatch.setattr(fused_loss, "kernels_enabled", lambda t: True)
    h, w, labels = _ce_case("cpu", torch.float32, seed=3)
    loss = fused_loss.linear_cross_entropy(h, w, labels, chunk=16)
    ref = torch.nn.functional.cross_entropy(h.double() @ w.double().t(), labels)
    assert abs(loss.item() - ref.item()) < 1e-5
