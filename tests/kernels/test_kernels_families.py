"""The fast path per model family: loss and LoRA gradients with the kernels on and off.

A tiny random model of each family trains one LoRA step on the GPU twice, once with the
Triton kernels (RMSNorm or Gemma's (1 + w) RMSNorm, SwiGLU or GeGLU, RoPE, fused LoRA,
chunked cross-entropy) and once with SLIMTUNE_KERNELS=0 (transformers' own modules, the
reference); bf16 base, fp32 adapters, bf16 autocast, as `slimtune train` runs on a GPU.
"""

import pytest
import torch

pytest.importorskip("triton")

from tiny_models import FAMILIES, family_model  # noqa: E402


def test_every_family_builds_and_patches_on_cpu():
    """The patch finds each family's norms and MLPs (on the CPU the modules' own forward runs)."""
    from slimtune.kernels.llama_ops import patch_llama, unpatch_rope

    for name in FAMILIES:
        model = family_model(name)
        ids = torch.randint(0, 256, (1, 9))
        with torch.no_grad():
            ref = model(input_ids=ids).logits
            assert patch_llama(model) >= 2 * 3 + 1, name  # per layer: norms and the MLP; final norm
            assert torch.equal(model(input_ids=ids).logits, ref), name
        unpatch_rope()


def _gpu_lora_model(name: str) -> torch.nn.Module:
    """The family's tiny model as `slimtune train` runs it on a GPU: a bf16 base, LoRA (r 8) on
    every linear layer with fp32 adapters, B ≠ 0 so that both A and B get gradients."""
    import slimtune as st

    model = family_model(name).to("cuda", torch.bfloat16)
    model = st.add_adapter(model, st.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
                if "lora_B" in n:
                    p.normal_(std=0.02)
    return model


def _one_step(model, ids, kernels: bool, monkeypatch) -> tuple[float, dict]:
    from slimtune.training.loss import causal_lm_loss

    monkeypatch.setenv("SLIMTUNE_KERNELS", "1" if kernels else "0")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_sum, count = causal_lm_loss(model, batch, 64)
    loss = loss_sum / count
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", FAMILIES)
def test_kernels_on_and_off_agree_gpu(name, monkeypatch):
    from slimtune.kernels.llama_ops import patch_llama, unpatch_rope

    model = _gpu_lora_model(name)
    ids = torch.randint(0, 256, (2, 128), device="cuda")
    ref_loss, ref_grads = _one_step(model, ids, False, monkeypatch)
    assert patch_llama(model) >= 7
    try:
        loss, grads = _one_step(model, ids, True, monkeypatch)
    finally:
        unpatch_rope()
    assert abs(loss - ref_loss) / ref_loss < 5e-3, (name, loss, ref_loss)
    for key, want in ref_grads.items():
        rel = ((grads[key] - want).norm() / want.norm().clamp(min=1e-12)).item()
        assert rel < 3e-2, (name, key, rel)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("offload", [False, True])
def test_recomputation_on_the_fast_path_gives_the_same_step_gpu(name, offload, monkeypatch):
    """Kernels on, every layer recomputed (its down projection's GEMM skipped where the family
    allows, inputs offloaded on the copy stream): the same loss and gradients as no recomputation."""
    from slimtune.kernels.llama_ops import patch_llama, unpatch_rope
    from slimtune.kernels.recompute import enable_checkpointing

    model = _gpu_lora_model(name)
    model.train()
    ids = torch.randint(0, 256, (2, 128), device="cuda")
    assert patch_llama(model) >= 7
    try:
        ref_loss, ref_grads = _one_step(model, ids, True, monkeypatch)
        enable_checkpointing(model, offload=offload)
        loss, grads = _one_step(model, ids, True, monkeypatch)
    finally:
        unpatch_rope()
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (name, loss, ref_loss)
    for key, want in ref_grads.items():
        torch.testing.assert_close(grads[key], want, rtol=1e-3, atol=1e-6, msg=key)
