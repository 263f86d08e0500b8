"""quant/triton.py: the Triton 4-bit dequantization kernel against its references.

On the CPU the kernel runs in Triton's interpreter; on CUDA (`gpu` marker) it is
compiled. References: slimtune's torch dequantization and bitsandbytes' own.
"""

import pytest
import torch

pytest.importorskip("triton")

from slimtune.quant.nf4 import quantize_4bit_state  # noqa: E402
from slimtune.quant.triton import dequantize_nf4_triton, dequantize_state_triton  # noqa: E402

CUDA = torch.cuda.is_available()


def _check_exact(shape, quant_type, blocksize, double, dtype, device, seed, tiled=True):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(device)
    w[0, :3] = 0.0  # exact zeros and an extreme value are part of the real inputs
    w.view(-1)[-1] = 0.5
    state = quantize_4bit_state(w, quant_type, blocksize, double_quant=double)
    ref = state.dequantize(dtype)
    out = dequantize_state_triton(state, dtype, tiled=tiled)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()


@pytest.mark.parametrize(
    "shape,quant_type,blocksize,double,dtype",
    [
        ((64, 128), "nf4", 64, True, torch.bfloat16),
        ((33, 70), "nf4", 64, True, torch.float32),  # short last block, odd rows
        ((5, 7), "nf4", 64, False, torch.float16),  # odd number of values
        ((48, 96), "fp4", 128, False, torch.bfloat16),
        ((40, 512), "nf4", 32, True, torch.bfloat16),  # several groups of 256 absmaxes
    ],
)
@pytest.mark.parametrize("tiled", [True, False])
def test_dequantize_matches_reference_cpu_interpreter(
    shape, quant_type, blocksize, double, dtype, tiled
):
    _check_exact(shape, quant_type, blocksize, double, dtype, "cpu", sum(shape), tiled)


def test_dequantize_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 200) * 0.05
    q, st = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    st.dtype = torch.bfloat16
    ref = bnb.dequantize_4bit(q, st)
    out = dequantize_nf4_triton(
        q, st.absmax, st.code, tuple(w.shape), torch.bfloat16, 64,
        absmax2=st.state2.absmax, code2=st.state2.code, offset=st.offset,
    )  # fmt: skip
    assert torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (1000, 333), (3, 5)])
def test_dequantize_matches_reference_gpu(shape, dtype):
    for double in (False, True):
        for tiled in (False, True):
            _check_exact(shape, "nf4", 64, double, dtype, "cuda", shape[0] + double, tiled)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 333)])
def test_dequantize_matches_bitsandbytes_cuda(shape):
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
    q, st = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    out = dequantize_nf4_triton(
        q, st.absmax, st.code, shape, torch.bfloat16, 64,
        absmax2=st.state2.absmax, code2=st.state2.code, offset=st.offset,
    )  # fmt: skip
    assert torch.equal(out, bnb.dequantize_4bit(q, st))
