"""Checks of a user's file before anything is allocated from what it declares.

A header says how big the rest of the file is; a damaged or hostile one can say anything.
These checks read headers with bounded reads and compare every declared size with the
real file size, so a reader never allocates or seeks from an unchecked number:

    safetensors   [u64 n][n bytes of JSON: {name: {dtype, shape, data_offsets: [b, e]}}][data]
                  n ≤ file size - 8;  0 ≤ b ≤ e ≤ data size;  e - b = Π shape · itemsize
    GGUF          "GGUF" u32 version, u64 tensors, u64 keys, keys (typed values), tensor
                  infos (name, dims, type, offset), padding to `general.alignment`, data
                  every count and string length fits in the bytes left; every tensor's
                  data (Π dims / block · bytes per block) ends inside the file

Every failure is a SlimtuneError naming the file (and the key or tensor at fault).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from slimtune.errors import SlimtuneError

MAX_HEADER = 100 * 2**20  # safetensors' own limit on its JSON header
MAX_TEXT_FILE = 64 * 2**20  # configs, state.json: a few KiB in practice
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def read_text_file(path: Path, what: str, limit: int = MAX_TEXT_FILE) -> str:
    """The UTF-8 text of a small file (a config, state.json), refusing huge or binary ones."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise SlimtuneError(f"{what} {path} is {size:,} bytes; at most {limit:,} are read")
        data = path.read_bytes()
    except OSError as exc:
        raise SlimtuneError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    return decode_utf8(data, path)


def decode_utf8(raw: bytes, path: Path, line: int = 0) -> str:
    """`raw` as UTF-8; a bad byte is a SlimtuneError naming the file and its line.

    `line` is the line number of `raw` when it is one line of the file; 0 when it is all of it.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = line or raw.count(b"\n", 0, exc.start) + 1
        raise SlimtuneError(
            f"{path}:{at}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the file as UTF-8"
        ) from None


def read_json_file(path: Path, what: str) -> Any:
    """A small JSON file, parsed; damage is a SlimtuneError naming the file and line."""
    text = read_text_file(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SlimtuneError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # 5000-digit numbers, [[[[…]]]]
        raise SlimtuneError(f"{path}: not valid JSON ({exc})") from None


# ----------------------------------------------------------------------------- safetensors


def check_safetensors(path: Path) -> dict[str, Any]:
    """The header of a safetensors file, after checking it against the file's size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise SlimtuneError(f"{path} is not a safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER):
                raise SlimtuneError(
                    f"{path} is truncated or not a safetensors file "
                    f"(its header claims {n:,} bytes; the file has {size:,})"
                )
            raw = handle.read(n)
    except OSError as exc:
        raise SlimtuneError(f"{path} cannot be read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SlimtuneError(f"{path} is damaged: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise SlimtuneError(f"{path} is damaged: its header is not a JSON object")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            _check_metadata(path, info)
        else:
            _check_tensor_entry(path, name, info, data_size)
    return header


def _check_metadata(path: Path, info: Any) -> None:
    if info is not None and (
        not isinstance(info, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in info.items())
    ):
        raise SlimtuneError(f"{path} is damaged: its __metadata__ is not string pairs")


def _check_tensor_entry(path: Path, name: str, info: Any, data_size: int) -> None:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_ITEMSIZE:
        raise SlimtuneError(f"{where} has no known dtype; the file is damaged")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2:
        raise SlimtuneError(f"{where} has a damaged shape or data_offsets")
    begin, end = offsets
    expected = math.prod(shape) * SAFETENSORS_ITEMSIZE[info["dtype"]]
    if not 0 <= begin <= end <= data_size or end - begin != expected:
        raise SlimtuneError(
            f"{where} claims bytes {begin}..{end} for shape {shape}; the file holds "
            f"{data_size:,} data bytes (truncated or damaged)"
        )


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value
    )


# ----------------------------------------------------------------------------- GGUF

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
GGUF_MAX_DIMS = 4


class _Cursor:
    """Bounded reads from a file: asking for more bytes than are left is a SlimtuneError."""

    def __init__(self, path: Path, handle, size: int) -> None:
        self.path, self.handle, self.size, self.pos = path, handle, size, 0

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise SlimtuneError(
                f"{self.path} is truncated or damaged ({what} at byte {self.pos} "
                f"needs {n:,} bytes; {self.size - self.pos:,} are left)"
            )
        self.pos += n
        return self.handle.read(n)

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.unpack("<Q", what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SlimtuneError(f"{self.path} is damaged: {what} is not UTF-8") from None

    def value(self, kind: int, what: str, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY:
            item, count = self.unpack("<I", what), self.unpack("<Q", what)
            if item in _SCALARS:  # skip fixed-size items without building a list
                self.take(count * struct.calcsize(_SCALARS[item]), what)
                return None
            if item not in (_STRING, _ARRAY) or count > self.size - self.pos or depth > 4:
                raise SlimtuneError(
                    f"{self.path} is truncated or damaged: {what} declares an array of "
                    f"{count:,} items of type {item}"
                )
            for _ in range(count):
                self.value(item, what, depth + 1)
            return None
        raise SlimtuneError(f"{self.path} is damaged: {what} has unknown value type {kind}")


def check_gguf(path: Path) -> None:
    """Walk a GGUF file's header; every tensor's data must lie inside the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            cur = _Cursor(path, handle, size)
            if cur.take(4, "the magic") != b"GGUF":
                raise SlimtuneError(f"{path} is not a GGUF file (it does not start with GGUF)")
            version = cur.unpack("<I", "the version")
            if version not in (2, 3):
                raise SlimtuneError(f"{path}: GGUF version {version} is not supported (2 or 3)")
            n_tensors, n_keys = cur.unpack("<Q", "the counts"), cur.unpack("<Q", "the counts")
            alignment = 32
            for _ in range(min(n_keys, size)):
                key = cur.string("a metadata key")
                value = cur.value(cur.unpack("<I", f"key {key!r}"), f"key {key!r}")
                if key == "general.alignment":
                    alignment = value if isinstance(value, int) and value > 0 else 0
            if alignment <= 0 or alignment & (alignment - 1):
                raise SlimtuneError(f"{path}: general.alignment is not a power of two")
            tensors = [_tensor_info(cur) for _ in range(min(n_tensors, size))]
    except OSError as exc:
        raise SlimtuneError(f"{path} cannot be read ({exc.strerror or exc})") from None
    start = -(-cur.pos // alignment) * alignment
    for name, dims, kind, offset in tensors:
        try:
            block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise SlimtuneError(f"{path}: tensor {name!r} has unknown type {kind}") from None
        count = math.prod(dims)
        if count % block or start + offset + count // block * nbytes > size:
            raise SlimtuneError(
                f"{path} is truncated or damaged: tensor {name!r} {dims} ends past the file's "
                f"{size:,} bytes"
            )


def _tensor_info(cur: _Cursor) -> tuple[str, list[int], int, int]:
    name = cur.string("a tensor name")
    n_dims = cur.unpack("<I", f"tensor {name!r}")
    if not 1 <= n_dims <= GGUF_MAX_DIMS:
        raise SlimtuneError(f"{cur.path} is damaged: tensor {name!r} has {n_dims} dimensions")
    dims = [cur.unpack("<Q", f"tensor {name!r}") for _ in range(n_dims)]
    kind, offset = cur.unpack("<I", f"tensor {name!r}"), cur.unpack("<Q", f"tensor {name!r}")
    return name, dims, kind, offset


def load_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file whose header was checked first."""
    from safetensors import SafetensorError, safe_open

    check_safetensors(path)
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise SlimtuneError(f"{path} is truncated or damaged ({exc})") from None
    return tensors, metadata
