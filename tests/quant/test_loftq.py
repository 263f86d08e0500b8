"""LoftQ initialisation against a hand-written SVD, and its effect on a tiny model."""

from __future__ import annotations

import torch

import slimtune as st
from slimtune.quant.loftq import loftq_decompose, loftq_init, low_rank


def test_low_rank_is_the_truncated_svd():
    torch.manual_seed(0)
    for shape in [(40, 90), (90, 40)]:
        m = torch.randn(shape)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        best = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]  # Eckart–Young: the best rank-5 fit
        a, b = low_rank(m, 5, scaling=2.0)
        assert a.shape == (5, shape[1]) and b.shape == (shape[0], 5)
        torch.testing.assert_close(2.0 * b @ a, best, rtol=1e-4, atol=1e-4)


def test_loftq_beats_plain_quantization():
    torch.manual_seed(1)
    w = torch.randn(96, 256) * 0.02
    w[:, :3] *= 20  # a few outlier columns: a low-rank error the adapter can take
    plain = st.quant.quantize(w, "nf4").dequantize(torch.float32)
    q, a, b = loftq_init(w, 8, scaling=0.5)
    assert torch.equal(q, plain)  # T = 1: the base is q(W), as QLoRA's
    error = (w - q - 0.5 * b @ a).norm()
    tail = torch.linalg.svdvals(w - plain)[8:]  # what a rank-8 adapter cannot take
    torch.testing.assert_close(error, tail.square().sum().sqrt(), rtol=1e-4, atol=0)
    assert error < 0.9 * (w - plain).norm()
    state, a5, b5 = loftq_decompose(w, 8, scaling=0.5, iters=4)
    assert (w - state.dequantize(torch.float32) - 0.5 * b5 @ a5).norm() <= error * 1.001


def test_loftq_through_add_adapter_brings_step_zero_closer(tiny_llama):
    model, _ = tiny_llama
    ids = torch.randint(0, 90, (2, 16))
    with torch.no_grad():
        reference = model(ids).logits
    plain = st.quantize_model(__import__("copy").deepcopy(model), "nf4")
    config = st.LoraConfig(
        r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="loftq"
    )
    st.add_adapter(model, config)
    st.quantize_model(model, "nf4")
    with torch.no_grad():
        loftq_gap = (model(ids).logits - reference).abs().mean()
        plain_gap = (plain(ids).logits - reference).abs().mean()
    assert loftq_gap < plain_gap
