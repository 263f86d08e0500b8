"""LoRA backward's two products of g in one kernel (kernels/lora_grad.py), run by Triton's
interpreter on the CPU, against float64 PyTorch: s · g B and gᵀ xs for ranks below, at and
above tl.dot's 16, shapes that no tile divides, fp32 and bf16, gb written into a column slice
of a wider buffer, and every (column block, row chunk) partial counted in the sums."""

from __future__ import annotations

import pytest
import torch

from slimtune.kernels.lora_grad import grad_products

pytest.importorskip("triton")

T, N = 100, 72  # neither a multiple of the tiles below
SMALL = {"BT": 16, "BN": 32}  # 7 row tiles, 3 column blocks (the last 8 wide)


def _inputs(r: int, dtype: torch.dtype, seed: int = 0):
    """g (T, N), B (N, r), and xs (T, r) as a column slice of a (T, 3r) buffer."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(T, N, generator=gen).to(dtype)
    b = torch.randn(N, r, generator=gen).to(dtype)
    xs = torch.randn(T, 3 * r, generator=gen).to(dtype)[:, r : 2 * r]
    return g, b, xs


def _reference(g, b, xs, scale):
    return scale * (g.double() @ b.double()), g.double().t() @ xs.double()


@pytest.mark.parametrize("r", [4, 16, 24])
@pytest.mark.parametrize(
    "dtype, gb_tol",
    [(torch.float32, 1e-5), (torch.bfloat16, 4e-3)],
    ids=["fp32", "bf16"],
)
def test_grad_products_match_float64(r, dtype, gb_tol):
    g, b, xs = _inputs(r, dtype)
    buf = torch.full((T, 3 * r), 7.0, dtype=dtype)
    out = buf[:, r : 2 * r]  # row stride 3r
    gbs, db = grad_products(g, b, xs, scale=0.5, out_gb=out, tiles=SMALL)
    want_gb, want_db = _reference(g, b, xs, 0.5)
    assert gbs.data_ptr() == out.data_ptr() and gbs.dtype == dtype
    assert db.shape == (N, r) and db.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_gb, rtol=gb_tol, atol=1e-4)
    torch.testing.assert_close(db.double(), want_db, rtol=1e-5, atol=1e-4)
    assert (buf[:, :r] == 7).all() and (buf[:, 2 * r :] == 7).all()  # the rest untouched


def test_grad_products_default_tiles_and_new_output():
    g, b, xs = _inputs(8, torch.float32, seed=1)
    gbs, db = grad_products(g, b, xs, scale=2.0)
    want_gb, want_db = _reference(g, b, xs, 2.0)
    assert gbs.shape == (T, 8) and gbs.dtype == torch.float32
    torch.testing.assert_close(gbs.double(), want_gb, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(db.double(), want_db, rtol=1e-5, atol=1e-4)


# 3 row chunks of 48 rows (the last one 4) and 3 column blocks of 32 columns (the last one 8)
CHUNKS, BLOCKS = [(0, 48), (48, 96), (96, 100)], [(0, 32), (32, 64), (64, 72)]


@pytest.mark.parametrize("chunk", range(3))
@pytest.mark.parametrize("block", range(3))
def test_every_partial_is_summed(block, chunk):
    """g is zero outside one (row chunk, column block) region: a partial left out of either
    sum leaves gb or dB zero where float64 has values."""
    g, b, xs = _inputs(16, torch.float32, seed=2)
    (r0, r1), (c0, c1) = CHUNKS[chunk], BLOCKS[block]
    region = torch.zeros_like(g)
    region[r0:r1, c0:c1] = g[r0:r1, c0:c1]
    gbs, db = grad_products(region, b, xs, scale=1.5, tiles={**SMALL, "chunks": 3})
    want_gb, want_db = _reference(region, b, xs, 1.5)
    assert want_gb[r0:r1].abs().min() > 0 and want_db[c0:c1].abs().min() > 0
    torch.testing.assert_close(gbs.double(), want_gb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), want_db, rtol=1e-5, atol=1e-5)


def test_sums_over_blocks_and_chunks():
    """The whole g over 3 column blocks and 7 row chunks (one row tile each)."""
    g, b, xs = _inputs(16, torch.bfloat16, seed=3)
    gbs, db = grad_products(g, b, xs, tiles={**SMALL, "chunks": 7})
    want_gb, want_db = _reference(g, b, xs, 1.0)
    torch.testing.assert_close(gbs.double(), want_gb, rtol=4e-3, atol=1e-4)
    torch.testing.assert_close(db.double(), want_db, rtol=1e-5, atol=1e-4)
