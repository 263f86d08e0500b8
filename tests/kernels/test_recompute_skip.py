"""A recomputed layer skips its last projection's base GEMM where only the residual sum reads it.

In backward a checkpointed decoder layer runs again only to rebuild its graph. In Llama-like
layers the MLP's down projection feeds `residual + mlp(h)` alone, and that sum's backward
reads no values, so `unread_projection` leaves the output uninitialised there. Checked on
the CPU (Triton interpreter, fused LoRA forced on): with those outputs poisoned with NaN, the
gradients equal a run without recomputation; a 4-bit down projection is dequantized twice a
step instead of three times; where the layer normalises the MLP output first (Gemma 2),
nothing is skipped.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import slimtune as st  # noqa: E402
from slimtune.kernels import llama_ops  # noqa: E402
from slimtune.kernels import lora as fused  # noqa: E402
from slimtune.kernels.recompute import enable_checkpointing  # noqa: E402
from tiny_models import family_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def kernels_forced(monkeypatch):
    """The CUDA path on the CPU: Triton kernels through the interpreter, fused LoRA forced."""
    monkeypatch.setattr(llama_ops, "kernels_enabled", lambda t: True)
    monkeypatch.setattr(fused, "use_fast", lambda t: True)
    yield
    llama_ops.unpatch_rope()


def _poison_unread(monkeypatch) -> list[int]:
    """Fill every skipped output with NaN (so a read would show) and count them."""
    calls = [0]
    original = llama_ops.unread_projection

    def poisoned(layer, x):
        y = original(layer, x)
        if y is not None:
            calls[0] += 1
            y.data.fill_(float("nan"))  # .data: the values alone, unseen by autograd
        return y

    monkeypatch.setattr(llama_ops, "unread_projection", poisoned)
    return calls


def _lora(name: str, quantized: bool = False, **sizes):
    model = family_model(name, **sizes)
    if quantized:
        from slimtune.quant.linear import quantize_model

        model = quantize_model(model, "nf4")
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if name == "phi3" else TARGETS
    model = st.add_adapter(model, st.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # non-zero B: every LoRA term counts
    llama_ops.patch_llama(model)
    return model.train()


def _grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("name", "skipped"), [("llama", 2), ("qwen3", 2), ("phi3", 2), ("gemma", 2), ("gemma2", 0)]
)
def test_gradients_equal_with_the_skipped_outputs_poisoned(name, skipped, kernels_forced,
                                                           monkeypatch):  # fmt: skip
    model = _lora(name)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    want = _grads(model, ids)  # nothing recomputed
    calls = _poison_unread(monkeypatch)
    assert enable_checkpointing(model) == 2
    got = _grads(model, ids)
    assert calls[0] == skipped  # one per recomputed layer, where the family allows it
    for key, grad in want.items():
        assert torch.isfinite(got[key]).all(), key
        torch.testing.assert_close(got[key], grad, rtol=1e-5, atol=1e-7, msg=key)


def test_a_4bit_down_projection_is_dequantized_twice_a_step_not_three_times(
    kernels_forced, monkeypatch
):
    model = _lora("llama", quantized=True, hidden_size=64, intermediate_size=128, head_dim=16)
    counted = [0]
    original = fused.dequantize

    def counting(state, dtype=None):
        counted[0] += tuple(state.shape) == (64, 128)  # down_proj's (hidden, intermediate) alone
        return original(state, dtype)

    monkeypatch.setattr(fused, "dequantize", counting)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    enable_checkpointing(model)
    _grads(model, ids)
    assert counted[0] == 2 * 2  # per layer: forward and backward, none in the recomputation
    for layer in model.model.layers:
        layer.mlp.feeds_residual_only = False  # the reference: recompute the GEMM as well
    counted[0] = 0
    _grads(model, ids)
    assert counted[0] == 3 * 2
