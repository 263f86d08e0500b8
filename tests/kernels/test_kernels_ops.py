"""fast_ops.py: Triton RMSNorm and SwiGLU against transformers' Llama modules.

CPU: Triton's interpreter in fp32; CUDA (`gpu` marker): compiled, bf16.
"""

import pytest
import torch

pytest.importorskip("triton")

from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm  # noqa: E402

from slimtune.kernels.llama_ops import (  # noqa: E402
    gelu_mul,
    patch_llama,
    rms_norm,
    rope,
    silu_mul,
    unpatch_rope,
)

CUDA = torch.cuda.is_available()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _check_norm(rows, d, device, dtype, tol):
    g = torch.Generator().manual_seed(rows + d)
    norm = LlamaRMSNorm(d, eps=1e-5).to(device, dtype).requires_grad_(False)
    norm.weight.copy_(torch.rand(d, generator=g).to(device, dtype) + 0.5)
    x = (torch.randn(rows, d, generator=g) * 3).to(device, dtype).requires_grad_(True)
    dy = torch.randn(rows, d, generator=g).to(device, dtype)
    ref = norm(x)
    (ref_dx,) = torch.autograd.grad(ref, x, dy)
    y = rms_norm(x, norm.weight, 1e-5)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert y.dtype == dtype and _rel(y, ref) < tol and _rel(dx, ref_dx) < tol


def _check_gemma_norm(rows, d, device, dtype, tol):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    g = torch.Generator().manual_seed(rows * d)
    norm = GemmaRMSNorm(d, eps=1e-6).to(device, dtype).requires_grad_(False)
    norm.weight.copy_((torch.rand(d, generator=g) - 0.5).to(device, dtype))  # 1 + w around 1
    x = (torch.randn(rows, d, generator=g) * 3).to(device, dtype).requires_grad_(True)
    dy = torch.randn(rows, d, generator=g).to(device, dtype)
    ref = norm(x)
    (ref_dx,) = torch.autograd.grad(ref, x, dy)
    y = rms_norm(x, norm.weight, 1e-6, gemma=True)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert y.dtype == dtype and _rel(y, ref) < tol and _rel(dx, ref_dx) < tol


def _check_geglu(shape, device, dtype, tol):
    g = torch.Generator().manual_seed(sum(shape) + 1)
    a, b = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_(True) for _ in "ab")
    dh = torch.randn(shape, generator=g).to(device, dtype)
    ref = torch.nn.functional.gelu(a, approximate="tanh") * b
    ref_grads = torch.autograd.grad(ref, (a, b), dh)
    h = gelu_mul(a, b)
    grads = torch.autograd.grad(h, (a, b), dh)
    assert _rel(h, ref) < tol
    for got, want in zip(grads, ref_grads, strict=True):
        assert _rel(got, want) < tol


def _check_swiglu(shape, device, dtype, tol):
    g = torch.Generator().manual_seed(sum(shape))
    a, b = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_(True) for _ in "ab")
    dh = torch.randn(shape, generator=g).to(device, dtype)
    ref = torch.nn.functional.silu(a) * b
    ref_grads = torch.autograd.grad(ref, (a, b), dh)
    h = silu_mul(a, b)
    grads = torch.autograd.grad(h, (a, b), dh)
    assert _rel(h, ref) < tol
    for got, want in zip(grads, ref_grads, strict=True):
        assert _rel(got, want) < tol


def _check_rope(b, h, kv, t, d, device, dtype, tol):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(t + d)
    # (B, T, H, D) projections viewed as (B, H, T, D), as the attention layer does
    q = torch.randn(b, t, h, d, generator=g).to(device, dtype).transpose(1, 2).requires_grad_(True)
    k = torch.randn(b, t, kv, d, generator=g).to(device, dtype).transpose(1, 2).requires_grad_(True)
    freqs = torch.randn(b, t, d // 2, generator=g).to(device)
    cos, sin = (
        torch.cat([freqs, freqs], -1).cos().to(dtype),
        torch.cat([freqs, freqs], -1).sin().to(dtype),
    )
    gq, gk = (
        torch.randn(q.shape, generator=g).to(device, dtype),
        torch.randn(k.shape, generator=g).to(device, dtype),
    )
    ref = apply_rotary_pos_emb(q, k, cos, sin)
    ref_grads = torch.autograd.grad(ref, (q, k), (gq, gk))
    out = rope(q, k, cos, sin)
    grads = torch.autograd.grad(out, (q, k), (gq, gk))
    for got, want in zip((*out, *grads), (*ref, *ref_grads), strict=True):
        assert got.shape == want.shape and _rel(got, want) < tol


def test_rope_interpreter():
    _check_rope(2, 4, 2, 19, 16, "cpu", torch.float32, 1e-5)


@pytest.mark.parametrize("rows,d", [(3, 64), (5, 100)])
def test_rms_norm_interpreter(rows, d):
    _check_norm(rows, d, "cpu", torch.float32, 1e-5)


def test_silu_mul_interpreter():
    _check_swiglu((3, 700), "cpu", torch.float32, 1e-5)


@pytest.mark.parametrize("rows,d", [(3, 64), (5, 100)])
def test_gemma_rms_norm_interpreter(rows, d):
    _check_gemma_norm(rows, d, "cpu", torch.float32, 1e-5)


def test_gelu_mul_interpreter():
    _check_geglu((3, 700), "cpu", torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gemma_norm_and_geglu_gpu():
    _check_gemma_norm(8192, 2304, "cuda", torch.bfloat16, 1e-2)
    _check_geglu((8192, 9216), "cuda", torch.bfloat16, 1e-2)


def test_patch_llama_keeps_the_reference_on_cpu():
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64)
    mlp, norm = LlamaMLP(cfg), LlamaRMSNorm(32)
    x = torch.randn(2, 32)
    ref = mlp(norm(x))
    assert patch_llama(torch.nn.ModuleList([mlp, norm])) == 2
    assert torch.equal(mlp(norm(x)), ref)  # CPU tensors: the modules' own forward
    unpatch_rope()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("rows,d", [(8192, 4096), (1000, 2048), (7, 100)])
def test_rms_norm_gpu(rows, d):
    _check_norm(rows, d, "cuda", torch.bfloat16, 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape", [(8192, 14336), (3, 1000)])
def test_silu_mul_gpu(shape):
    _check_swiglu(shape, "cuda", torch.bfloat16, 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("t", [2048, 77])
def test_rope_gpu(t):
    _check_rope(4, 32, 8, t, 128, "cuda", torch.bfloat16, 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_patched_llama_matches_unpatched_gpu():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).requires_grad_(False)
    ids = torch.randint(0, 128, (2, 64), device="cuda")
    ref = model(input_ids=ids).logits.float()
    assert patch_llama(model) == 2 * 3 + 1
    try:
        out = model(input_ids=ids).logits.float()
    finally:
        unpatch_rope()
    assert _rel(out, ref) < 2e-2
