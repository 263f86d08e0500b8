"""NF4/FP4 (+ double quantization) against bitsandbytes' CPU implementation, byte for byte."""

from __future__ import annotations

import itertools

import pytest
import torch

import slimtune as st
from slimtune.errors import SlimtuneError
from slimtune.quant import blockwise, nf4

bnbf = pytest.importorskip("bitsandbytes.functional")
from bitsandbytes.backends.default import ops as bnb_default  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor (so -0.0 != +0.0 and NaN == NaN)."""
    if not t.is_floating_point():
        return t.reshape(-1)
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).reshape(-1)


def _bnb_kernel_is_sound(shape: tuple[int, ...], blocksize: int) -> bool:
    """bitsandbytes' AVX-512 4-bit dequantizer (even last dim, a multiple of 16, blocksize
    < 2048) indexes absmax per row (last_dim // blocksize blocks per row): wrong unless the
    last dim is a multiple of the block size. Elsewhere it is right, and we compare with it;
    we always compare with its pure-torch reference too."""
    last = shape[-1]
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    kernel = avx512 and last % 16 == 0 and 16 <= blocksize < 2048
    return not kernel or last % blocksize == 0


def _bnb_reference_dequant(packed, absmax, quant_type, blocksize, shape, dtype):
    """bitsandbytes' own pure-torch dequantizer (its default backend), uncompiled."""
    compute = bnb_default._dequantize_4bit_compute.__wrapped__
    code = bnbf.get_4bit_type(quant_type, device="cpu")
    return compute(packed.reshape(-1), absmax, code, blocksize, shape, dtype)


def _compare(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> None:
    packed, state = bnbf.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    q = st.quant.quantize(w, quant_type, blocksize=blocksize, double_quant=double_quant)
    assert q.codes.dtype == torch.uint8 and torch.equal(q.codes, packed.reshape(-1))
    assert (
        torch.equal(_bits(q.absmax), _bits(state.absmax)) and q.absmax.dtype == state.absmax.dtype
    )
    assert torch.equal(q.code, state.code)
    if double_quant:
        assert torch.equal(_bits(q.absmax2), _bits(state.state2.absmax))
        assert torch.equal(_bits(q.offset), _bits(state.offset))
        assert torch.equal(blockwise.dynamic_map(), state.state2.code)
    ours = q.dequantize().reshape(-1)
    assert ours.dtype == w.dtype
    fp32_absmax = q.fp32_absmax()
    if double_quant:
        theirs = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(_bits(fp32_absmax), _bits(theirs))
    reference = _bnb_reference_dequant(packed, fp32_absmax, quant_type, blocksize, w.shape, w.dtype)
    assert torch.equal(_bits(ours), _bits(reference))
    if _bnb_kernel_is_sound(tuple(w.shape), blocksize):
        theirs = bnbf.dequantize_4bit(packed, state).reshape(-1)
        if (
            quant_type == "fp4"
        ):  # its scalar C++ kernel decodes code 0b1000 as -0.0, AVX-512 as +0.0
            ours, theirs = ours + 0.0, theirs + 0.0  # -0.0 + 0.0 = +0.0
        assert torch.equal(_bits(ours), _bits(theirs))


SHAPES = [(1, 1), (3, 100), (17, 333), (64, 64), (5, 4096), (130, 258), (70000,)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_shapes_match_bitsandbytes(quant_type, dtype):
    gen = torch.Generator().manual_seed(0)
    for shape, blocksize, dq in itertools.product(SHAPES, [64, 32, 256], [True, False]):
        _compare(torch.randn(shape, generator=gen).to(dtype), quant_type, blocksize, dq)


def _hard_weights(gen: torch.Generator) -> dict[str, torch.Tensor]:
    outliers = torch.randn(40, 200, generator=gen) * 0.02
    outliers[:, 7] = 80.0 * torch.randn(40, generator=gen)
    part_zero = torch.randn(30, 100, generator=gen)
    part_zero[:10] = 0.0  # whole blocks of zeros, and a zero tail block
    part_zero[-1, 50:] = 0.0
    return {
        "zeros": torch.zeros(33, 77),
        "constant": torch.full((20, 70), 0.37),
        "negative_constant": torch.full((3, 65), -2.5),
        "tiny": torch.randn(50, 130, generator=gen) * 1e-8,
        "heavy_tails": torch.distributions.StudentT(1.5).sample((64, 300)),
        "outlier_column": outliers,
        "part_zero": part_zero,
        "many_blocks": torch.randn(257 * 64 + 5, generator=gen),  # 258 blocks: 2 nested groups
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_distributions_match_bitsandbytes(dtype):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    for name, w in _hard_weights(gen).items():
        for quant_type, dq in itertools.product(["nf4", "fp4"], [True, False]):
            try:
                _compare(w.to(dtype), quant_type, 64, dq)
            except AssertionError as exc:
                raise AssertionError(f"{name} {quant_type} double_quant={dq}") from exc


@pytest.mark.parametrize("blocksize", [32, 128, 512, 1024, 2048, 4096])
def test_all_block_sizes_match_bitsandbytes(blocksize):
    w = torch.randn(37, 1000, generator=torch.Generator().manual_seed(2))
    for quant_type in ("nf4", "fp4"):
        _compare(w, quant_type, blocksize, True)


def test_blockwise_8bit_matches_bitsandbytes_kernel():
    gen = torch.Generator().manual_seed(3)
    code = bnbf.create_dynamic_map()
    assert torch.equal(blockwise.dynamic_map(), code)
    for scale in (1e-6, 1e-2, 1.0, 300.0):
        x = torch.randn(100_003, generator=gen) * scale
        x[5000:5600] = 0.0  # an all-zero block
        ours, absmax = blockwise.quantize_blockwise(x, code, 256)
        theirs, their_absmax = bnbf.quantize_blockwise(x, code=code, blocksize=256)
        assert torch.equal(ours, theirs) and torch.equal(absmax, their_absmax.absmax)
        back = bnbf.dequantize_blockwise(theirs, their_absmax)
        assert torch.equal(
            _bits(blockwise.dequantize_blockwise(ours, absmax, code, 256)), _bits(back)
        )


def test_layout_high_nibble_first_and_codebook():
    # four values that are exactly levels 15, 0, 7 and 8 of NF4 in one block
    levels = nf4.codebook("nf4")
    w = torch.stack([levels[15], levels[0], levels[7], levels[8]]).view(1, 4)
    q = st.quant.quantize(w, "nf4", blocksize=64, double_quant=False)
    assert q.codes.tolist() == [0xF0, 0x78]
    assert torch.equal(q.dequantize(), w)
    assert torch.equal(nf4.codebook("fp4"), bnbf.get_4bit_type("fp4", device="cpu"))


def test_storage_bits_per_parameter():
    w = torch.randn(4096, 4096)
    q = st.quant.quantize(w, "nf4", blocksize=64, double_quant=True)
    bits = 8 * q.nbytes / w.numel()
    assert bits <= 4.13
    expected = w.numel() / 2 + w.numel() / 64 + 4 * w.numel() / 64 / 256 + 4  # codes, a, a2, offset
    assert q.nbytes == expected
    single = st.quant.quantize(w, "nf4", blocksize=64, double_quant=False)
    assert 8 * single.nbytes / w.numel() == 4.5


def test_errors_are_one_line_and_named():
    w = torch.randn(4, 64)
    cases = [
        (lambda: st.quant.quantize(w, "nf3"), "'nf3'"),
        (lambda: st.quant.quantize(w, "nf4", blocksize=48), "48"),
        (lambda: st.quant.quantize(w, "nf4", blocksize=8192), "8192"),
        (lambda: st.quant.quantize(torch.ones(4, 4, dtype=torch.int32), "nf4"), "int32"),
        (lambda: st.quant.quantize(w.double(), "fp4"), "float64"),
    ]
    for call, name in cases:
        with pytest.raises(SlimtuneError) as info:
            call()
        message = str(info.value)
        assert name in message and "\n" not in message


def test_dequantize_nf4_is_bitsandbytes_reference():
    """The NF4 reference the Triton kernel is compared with, against bitsandbytes' own."""
    w = torch.randn(9, 130, generator=torch.Generator().manual_seed(4))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    for dtype in DTYPES:
        ours = nf4.dequantize_nf4(packed, state.absmax, 64, w.shape, dtype)
        theirs = _bnb_reference_dequant(packed, state.absmax, "nf4", 64, w.shape, dtype)
        assert ours.dtype == dtype and torch.equal(_bits(ours), _bits(theirs))


def test_quantize_4bit_defaults_to_nf4_in_blocks_of_64():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    codes, absmax = nf4.quantize_4bit(w)
    want_codes, want_absmax = nf4.quantize_4bit(w, "nf4", 64)
    assert torch.equal(codes, want_codes) and torch.equal(absmax, want_absmax)
    assert absmax.numel() == w.numel() // 64


def test_blockwise_quantization_defaults_to_blocks_of_256():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    code = blockwise.dynamic_map()
    codes, absmax = blockwise.quantize_blockwise(x, code)
    want_codes, want_absmax = blockwise.quantize_blockwise(x, code, 256)
    assert torch.equal(codes, want_codes) and torch.equal(absmax, want_absmax)
    assert absmax.numel() == 4  # ⌈1000 / 256⌉
    torch.testing.assert_close(
        blockwise.dequantize_blockwise(codes, absmax, code),
        blockwise.dequantize_blockwise(codes, absmax, code, 256),
        rtol=0,
        atol=0,
    )
