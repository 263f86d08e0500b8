"""kernels/compute_copies.py: bf16 copies of fp32 adapter matrices, made once a step."""

import pytest
import torch

from slimtune.kernels import compute_copies
from slimtune.kernels import lora as fast
from slimtune.kernels.compute_copies import compute_copy


@pytest.fixture
def copies_counted(monkeypatch):
    """The number of tensors each `_foreach_copy_` pass copied, in order."""
    passes = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda d, s: passes.append(len(d)) or real(d, s))
    return passes


def test_a_group_is_its_members_stacked_in_the_compute_dtype():
    a = [torch.randn(r, 12, requires_grad=True) for r in (4, 2, 8)]
    got = compute_copy(a, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and not got.requires_grad
    assert torch.equal(got, torch.cat([t.detach().to(torch.bfloat16) for t in a]))
    assert compute_copy(a[:1], torch.float32) is not a[0]  # same dtype: the values, detached
    assert torch.equal(compute_copy(a[:1], torch.float32), a[0])


def test_copies_are_made_once_and_refreshed_together_after_an_update(copies_counted):
    a = torch.nn.Parameter(torch.randn(4, 8))
    b = torch.nn.Parameter(torch.randn(6, 4))
    first_a = compute_copy((a,), torch.bfloat16)
    compute_copy((b,), torch.bfloat16)
    assert copies_counted == [1, 1]
    assert compute_copy((a,), torch.bfloat16) is first_a and copies_counted == [1, 1]  # current
    assert len(compute_copies._live) == 2  # the copies of earlier tests died with their tensors
    opt = torch.optim.SGD([a, b], lr=0.5)
    (a.sum() + b.sum()).backward()
    opt.step()  # both change in place; the step's end refreshes both copies in one pass
    assert copies_counted == [1, 1, 2]
    got_a = compute_copy((a,), torch.bfloat16)
    assert torch.equal(got_a, a.detach().to(torch.bfloat16))
    assert torch.equal(compute_copy((b,), torch.bfloat16), b.detach().to(torch.bfloat16))
    assert copies_counted == [1, 1, 2]
    with torch.no_grad():
        b.add_(1.0)  # changed outside an optimizer: refreshed where it is used
    assert torch.equal(compute_copy((b,), torch.bfloat16), b.detach().to(torch.bfloat16))
    assert copies_counted == [1, 1, 2, 1]
    a.data = torch.zeros(4, 8)  # new storage, version unchanged: stale too
    assert torch.equal(compute_copy((a,), torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16))


def test_the_fused_lora_computes_with_the_current_weights_step_after_step():
    """bf16 activations with fp32 adapters: every step's output equals the plain cast's."""
    torch.manual_seed(0)
    x = torch.randn(5, 16).to(torch.bfloat16)
    w = torch.randn(8, 16).to(torch.bfloat16)
    a, b = torch.nn.Parameter(torch.randn(4, 16)), torch.nn.Parameter(torch.randn(8, 4))
    opt = torch.optim.AdamW([a, b], lr=0.1)
    for _ in range(3):
        y = fast.lora_linear(x, w, None, a, b, 1.0)
        bf = torch.bfloat16
        want = torch.mm(torch.mm(x, a.detach().to(bf).t()), b.detach().to(bf).t()).addmm_(x, w.t())
        assert torch.equal(y, want)
        y.float().square().sum().backward()
        opt.step()
        opt.zero_grad()


def test_a_backward_after_its_copy_was_refreshed_fails_loudly():
    x = torch.randn(3, 8).to(torch.bfloat16)
    w = torch.randn(6, 8).to(torch.bfloat16)
    a, b = torch.nn.Parameter(torch.randn(2, 8)), torch.nn.Parameter(torch.randn(6, 2))
    y = fast.lora_linear(x, w, None, a, b, 1.0)
    with torch.no_grad():
        a.add_(1.0)
    compute_copies.refresh()
    with pytest.raises(RuntimeError, match="inplace"):
        y.float().sum().backward()
