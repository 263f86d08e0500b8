"""int8 row-wise quantization (LLM.int8()) against bitsandbytes' int8_vectorwise_quant."""

from __future__ import annotations

import pytest
import torch

import slimtune as st
from slimtune.errors import SlimtuneError

bnbf = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codes_and_row_absmax_match_bitsandbytes(dtype):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(33, 130, generator=gen) * 0.05).to(dtype)
    codes, stats, _ = bnbf.int8_vectorwise_quant(w.clone())
    q = st.quant.quantize(w, "int8", threshold=0.0)
    assert torch.equal(q.codes, codes) and torch.equal(q.absmax, stats)
    assert q.outlier_columns.numel() == 0
    assert torch.equal(q.dequantize(torch.float32), bnbf.int8_vectorwise_dequant(codes, stats))
    assert q.dequantize().dtype == dtype
    assert q.nbytes == 33 * 130 + 4 * 33 + 0


def test_outlier_columns_stay_16_bit_as_llm_int8():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=gen)
    w[3, 10] = 9.0  # one outlier in column 10
    w[:, 40] = -7.5  # a whole column of outliers
    codes, stats, cols = bnbf.int8_vectorwise_quant(w.clone(), threshold=6.0)
    q = st.quant.quantize(w, "int8")  # threshold 6.0 by default
    assert cols.tolist() == [10, 40] and torch.equal(q.outlier_columns, cols.long())
    assert torch.equal(q.codes, codes) and torch.equal(q.absmax, stats)
    deq = q.dequantize(torch.float32)
    expected = bnbf.int8_vectorwise_dequant(codes, stats)
    expected[:, [10, 40]] = w[:, [10, 40]].half().float()  # kept in 16 bits
    assert torch.equal(deq, expected)
    assert q.nbytes == 16 * 64 + 4 * 16 + 8 * 2 + 2 * 16 * 2


def test_zero_row_and_errors():
    w = torch.randn(4, 8)
    w[2] = 0.0
    q = st.quant.quantize(w, "int8")
    assert torch.equal(q.dequantize()[2], torch.zeros(8)) and q.codes[2].eq(0).all()
    with pytest.raises(SlimtuneError, match=r"2-D weight"):
        st.quant.quantize(torch.randn(10), "int8")
