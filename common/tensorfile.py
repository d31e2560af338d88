"""Safetensors bodies: strict parsing from a file or from memory, and checking against an expected schema.

The one header parser in cotune: uploads and adapters on the wire, and checkpoint weights on
disk (`common.checkpoint`), which may hold dtypes the wire never carries (BF16).

Why not `safetensors.safe_open`: the coordinator must refuse a hostile body (a huge
header length, overlapping or out-of-range offsets, unknown dtypes) with a precise reason
before it trusts any of it, and must not read the whole body into memory to do so. The
layout is small and documented (8-byte little-endian header length, JSON header, raw
little-endian data), so the checks are written here and the data is then memory-mapped.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_HEADER_BYTES = 16 * 1024 * 1024

# safetensors dtype name -> numpy dtype (little endian). BF16 has no numpy dtype and
# is not used on the wire by cotune; it is refused with a reason like any other.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = {"F64", "F32", "F16"}
# Bytes per element of every dtype a checkpoint may hold, wire dtypes included.
DTYPE_WIDTHS: dict[str, int] = {
    **{name: dtype.itemsize for name, dtype in DTYPES.items()},
    "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


class TensorFileError(ValueError):
    """A body that is not a well-formed safetensors file, or not the expected one."""

    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class TensorFileHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def _bad(message: str, hint: str = "send a file written by safetensors.save") -> TensorFileError:
    return TensorFileError("invalid_safetensors", message, hint)


def _read_range(source: Path | bytes, start: int, length: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[start : start + length])
    with source.open("rb") as fh:
        fh.seek(start)
        return fh.read(length)


def _header_bytes(source: Path | bytes, max_header_bytes: int) -> tuple[int, int, bytes]:
    """(total size, header length, raw header) of a file or an in-memory body."""
    total = len(source) if isinstance(source, (bytes, bytearray, memoryview)) else source.stat().st_size
    if total < 8:
        raise _bad(f"body is {total} bytes; a safetensors file starts with an 8-byte header length")
    (header_len,) = struct.unpack("<Q", _read_range(source, 0, 8))
    if header_len > max_header_bytes or header_len > total - 8:
        raise _bad(
            f"header length {header_len} is larger than the body ({total} bytes) "
            f"or the limit ({max_header_bytes} bytes)"
        )
    return total, header_len, _read_range(source, 8, header_len)


def read_header(
    source: Path | bytes, max_header_bytes: int = MAX_HEADER_BYTES, *, wire_dtypes: bool = True
) -> TensorFileHeader:
    """Parse and check the header of a safetensors file (or body in memory) without reading its data.

    `wire_dtypes=False` is for model checkpoints: any dtype name is accepted (BF16, F8_E4M3, ...)
    and tensor sizes are checked wherever the dtype's width is known.
    """
    total, header_len, raw = _header_bytes(source, max_header_bytes)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"header is not JSON: {exc}") from None
    except RecursionError:
        raise _bad("header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise _bad("header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad("__metadata__ must map strings to strings")

    data_len = total - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _bad(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or (wire_dtypes and dtype not in DTYPES):
            raise _bad(f"tensor {name!r}: unsupported dtype {dtype!r}", f"use one of {sorted(DTYPES)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise _bad(f"tensor {name!r}: shape must be a list of non-negative integers")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise _bad(f"tensor {name!r}: data_offsets {offsets!r} fall outside the data")
        width = DTYPE_WIDTHS.get(dtype)
        if width is not None and offsets[1] - offsets[0] != math.prod(shape) * width:
            raise _bad(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} {dtype}")
        tensors[name] = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])

    # The data region must be covered exactly, with no overlaps and no gaps.
    cursor = 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != cursor:
            raise _bad(f"tensor {name!r}: data overlaps another tensor or leaves a gap")
        cursor = info.end
    if cursor != data_len:
        raise _bad(f"{data_len - cursor} trailing bytes after the last tensor")
    return TensorFileHeader(tensors=tensors, metadata=dict(metadata), data_start=8 + header_len)


def load_arrays(path: Path, header: TensorFileHeader | None = None) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a checked file (read-only views, no copy)."""
    header = header or read_header(path)
    arrays: dict[str, np.ndarray] = {}
    if not header.tensors:
        return arrays
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.tensors.items():
        chunk = mm[header.data_start + info.begin : header.data_start + info.end]
        arrays[name] = chunk.view(DTYPES[info.dtype]).reshape(info.shape)
    return arrays


Schema = Mapping[str, tuple[tuple[int, ...], str]]


def schema_of(header: TensorFileHeader) -> dict[str, tuple[tuple[int, ...], str]]:
    return {name: (info.shape, info.dtype) for name, info in header.tensors.items()}


def check_schema(header: TensorFileHeader, expected: Schema) -> None:
    """Names, shapes and dtypes must be exactly those expected."""
    got = set(header.tensors)
    want = set(expected)
    if got != want:
        missing = sorted(want - got)[:5]
        extra = sorted(got - want)[:5]
        raise TensorFileError(
            "wrong_tensors",
            f"tensor names differ from the round's adapter: missing {missing}, unexpected {extra}",
            "train on the adapter this round published, with the run's LoRA settings",
        )
    for name, (shape, dtype) in expected.items():
        info = header.tensors[name]
        if info.shape != tuple(shape) or info.dtype != dtype:
            raise TensorFileError(
                "wrong_tensors",
                f"tensor {name!r} is {info.dtype}{list(info.shape)}, expected {dtype}{list(shape)}",
                "train on the adapter this round published, with the run's LoRA settings",
            )


def check_finite(arrays: Mapping[str, np.ndarray]) -> None:
    for name, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise TensorFileError(
                "non_finite",
                f"tensor {name!r} holds NaN or Inf",
                "lower the learning rate or clip gradients on the device, then retrain",
            )


def save_arrays(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize arrays as a safetensors body whose bytes are a pure function of the input.

    Written here because `safetensors.save` emits `__metadata__` from a hash map, so its key
    order (and with it the sha256 that makes uploads idempotent) changes between calls. The
    header is canonical JSON: sorted metadata, tensors by dtype width then name.
    """
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata keys and values must be strings")
    names = {dtype: name for name, dtype in DTYPES.items()}
    prepared: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        arr = np.ascontiguousarray(value)
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
        if dtype not in names:
            raise ValueError(f"tensor {key!r}: dtype {arr.dtype} cannot go into safetensors")
        prepared[key] = arr.astype(dtype, copy=False)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    chunks: list[bytes] = []
    offset = 0
    for key in sorted(prepared, key=lambda k: (-prepared[k].dtype.itemsize, k)):
        raw = prepared[key].tobytes()
        header[key] = {"dtype": names[prepared[key].dtype], "shape": list(prepared[key].shape),
                       "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-(8 + len(head)) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)
