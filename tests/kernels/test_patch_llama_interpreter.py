"""patch_llama's wiring on the CPU: the patched RMSNorm, SwiGLU MLP and RoPE forwards take
their Triton path (run by Triton's interpreter) and a whole Llama gives transformers' own
logits and input gradients. A swapped gate and up, a norm without its weight or a RoPE on
the wrong half would each move them."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from slimtune.kernels import llama_ops  # noqa: E402


def test_patched_llama_matches_transformers_through_the_interpreter(tiny_llama, monkeypatch):
    model, _ = tiny_llama
    model.requires_grad_(False)  # a frozen base: what the fast norm serves
    reference = copy.deepcopy(model)
    with torch.no_grad():  # larger weights, so every wiring mistake shows in the logits
        for p in model.parameters():
            p.mul_(5.0)
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            q.copy_(p)
    used = {"rms_norm": 0, "silu_mul": 0, "rope": 0}
    for name in used:
        kernel = getattr(llama_ops, name)
        monkeypatch.setattr(llama_ops, name, lambda *a, _k=kernel, _n=name, **k: (
            used.__setitem__(_n, used[_n] + 1), _k(*a, **k))[1])  # fmt: skip
    monkeypatch.setattr(llama_ops, "kernels_enabled", lambda t: True)  # CPU: the interpreter
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(0))

    def run(m):
        embeds = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = m(inputs_embeds=embeds).logits
        (grad,) = torch.autograd.grad(logits.square().sum(), embeds)
        return logits, grad

    ref_logits, ref_grad = run(reference)  # before patching: RoPE is patched per process
    try:
        assert llama_ops.patch_llama(model) == 2 * 2 + 2 + 1  # norms, MLPs, final norm
        logits, grad = run(model)
    finally:
        llama_ops.unpatch_rope()
    assert used["silu_mul"] == 2 and used["rope"] == 2 and used["rms_norm"] == 5
    for got, want in ((logits, ref_logits), (grad, ref_grad)):  # fp32: rounding only
        assert ((got - want).norm() / want.norm()).item() < 1e-5
