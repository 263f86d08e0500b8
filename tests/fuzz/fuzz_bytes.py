"""Damaged copies of a good file, as a hypothesis strategy.

    flips        a few bytes set to random values
    cuts         the file cut at a length from every class (0, 1, a few, half, all but one)
    insertions   random bytes spliced in
    numbers      a little-endian u64/u32 written somewhere as a huge or tiny value
                 (a header's declared size or count)
    junk         empty, or random binary of any length

`examples(n)` sets a test's example count: n in `make test`, 20·n under `make fuzz`.
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

LONG = os.environ.get("SLIMTUNE_FUZZ") == "long"
QUIET = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


def examples(n: int):
    """A settings decorator: n examples in CI, 20·n under `make fuzz` (SLIMTUNE_FUZZ=long).

    CI runs a fixed set (derandomize: no flicker); the long run draws new ones each time.
    Deadlines are off: the machine is shared.
    """
    return settings(max_examples=n * 20 if LONG else n, derandomize=not LONG, deadline=None,
                    database=None, suppress_health_check=QUIET)  # fmt: skip


HUGE = [2**64 - 1, 2**63, 2**40, 2**32 - 1, 2**31, 10**9, 0, 1]


@st.composite
def damaged(draw, good: bytes) -> bytes:
    kind = draw(st.sampled_from(["flips", "cut", "insert", "number", "junk"]))
    size = len(good)
    if kind == "junk" or size == 0:
        return draw(st.binary(max_size=512))
    if kind == "cut":
        classes = [0, 1, min(8, size - 1), size // 2, size - 1]
        cut = draw(st.sampled_from(classes) | st.integers(0, size - 1))
        return good[:cut]
    data = bytearray(good)
    if kind == "flips":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, size - 1))
            data[at] = draw(st.integers(0, 255).filter(lambda b, old=data[at]: b != old))
        return bytes(data)
    if kind == "insert":
        at = draw(st.integers(0, size))
        return bytes(data[:at]) + draw(st.binary(min_size=1, max_size=64)) + bytes(data[at:])
    at = draw(st.integers(0, max(0, size - 8)))  # near a header's counts more often
    fmt = draw(st.sampled_from(["<Q", "<I"]))
    value = draw(st.sampled_from(HUGE)) % (2 ** (8 * struct.calcsize(fmt)))
    packed = struct.pack(fmt, value)
    data[at : at + len(packed)] = packed
    return bytes(data[:size])


@st.composite
def near_header(draw, good: bytes, header_end: int) -> bytes:
    """Damage aimed at the first `header_end` bytes, where the declared sizes live."""
    head = draw(damaged(good[:header_end]))
    return head + good[header_end:]


def json_values():
    """Any JSON value, nested a little: the wrong types a hand-edited file can hold."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=8,
    )
