"""Hostile or malformed safetensors bodies are refused with a precise reason."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from common.tensorfile import (
    TensorFileError,
    check_finite,
    check_schema,
    load_arrays,
    read_header,
    save_arrays,
)


def _write(tmp_path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path = tmp_path / "body.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def test_roundtrip_keeps_values_and_metadata(tmp_path: Path) -> None:
    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(4, dtype=np.float32)}
    path = tmp_path / "x.safetensors"
    path.write_bytes(save_arrays(arrays, {"cotune.num_samples": "7"}))
    header = read_header(path)
    assert header.metadata == {"cotune.num_samples": "7"}
    loaded = load_arrays(path, header)
    for name, arr in arrays.items():
        np.testing.assert_array_equal(loaded[name], arr)


def test_equal_input_gives_equal_bytes() -> None:
    a = {"x": np.ones(3, np.float32), "y": np.zeros(2, np.float32)}
    b = {"y": np.zeros(2, np.float32), "x": np.ones(3, np.float32)}
    assert save_arrays(a) == save_arrays(b)


@pytest.mark.parametrize(
    ("header", "data", "header_len", "needle"),
    [
        ({}, b"", 10**12, "header length"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "outside"),
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "bytes for shape"),
        ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unsupported dtype"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlaps",
        ),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9, None, "trailing"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "non-negative"),
        ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
    ],
)
def test_malformed_headers_are_refused(tmp_path, header, data, header_len, needle) -> None:
    path = _write(tmp_path, header, data, header_len)
    with pytest.raises(TensorFileError) as info:
        read_header(path)
    assert info.value.code == "invalid_safetensors"
    assert needle in info.value.message


def test_not_json_and_too_short(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"abc")
    with pytest.raises(TensorFileError, match="8-byte"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(TensorFileError, match="not JSON"):
        read_header(path)


def test_schema_and_finite_checks(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(save_arrays({"w": np.array([1.0, np.nan], np.float32)}))
    header = read_header(path)
    check_schema(header, {"w": ((2,), "F32")})
    with pytest.raises(TensorFileError, match="expected F32\\[3\\]"):
        check_schema(header, {"w": ((3,), "F32")})
    with pytest.raises(TensorFileError, match="F16"):
        check_schema(header, {"w": ((2,), "F16")})
    with pytest.raises(TensorFileError, match="missing"):
        check_schema(header, {"w": ((2,), "F32"), "v": ((1,), "F32")})
    with pytest.raises(TensorFileError) as info:
        check_finite(load_arrays(path, header))
    assert info.value.code == "non_finite"
