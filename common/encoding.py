"""How an update travels (`RunSpec.update_encoding`): the device encodes, the coordinator decodes
before anything checks or aggregates it (ARCHITECTURE.md, "Update encodings").

- `fp32`: the trained tensors as they are, byte for byte (the default).
- `fp16`: the change from the round's starting tensors, in half precision. A change is small
  next to the values it changes, so half precision of the change loses far less than half
  precision of the values would; the relative error per coordinate is at most 2^-11.
- `int8-tensor` / `int8-row`: the change, quantised symmetrically to int8 with one float32 scale
  per tensor or per row, rounded to nearest: per coordinate the error is at most half a step,
  scale / 2 with scale = max |change| / 127 over the tensor or the row. A matrix's rows are
  taken along its shorter side (a LoRA factor gets one scale per rank component, for A and for
  B alike), so scales stay a small fraction of the bytes; a vector gets one scale.

bf16 is not offered: its advantage over fp16 is range, which a change does not need, and it
keeps three fewer bits of precision.

Tensors the run keeps frozen (FFA-LoRA's lora_A) go as they are in every encoding, so the
coordinator's bit-for-bit check on them still holds. A scale travels as its own float32 tensor,
named after its tensor with SCALE_SUFFIX.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np

Encoding = Literal["fp32", "fp16", "int8-tensor", "int8-row"]
ENCODINGS: tuple[str, ...] = ("fp32", "fp16", "int8-tensor", "int8-row")
SCALE_SUFFIX = ":scale"
_FP16_MAX = float(np.finfo(np.float16).max)

Schema = Mapping[str, tuple[tuple[int, ...], str]]
Frozen = Callable[[str], bool]


def _never(_name: str) -> bool:
    return False


def _row_axis(shape: tuple[int, ...], encoding: str) -> int | None:
    """The axis whose slices get a scale each under int8-row (None: one scale for the tensor)."""
    if encoding != "int8-row" or len(shape) < 2:
        return None
    return 1 if len(shape) == 2 and shape[1] < shape[0] else 0


def _scale_shape(shape: tuple[int, ...], encoding: str) -> tuple[int, ...]:
    axis = _row_axis(shape, encoding)
    return (1,) if axis is None else (shape[axis],)


def _per_slice(scale: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Scales shaped to broadcast along `axis` of a tensor of `ndim` dimensions."""
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def wire_schema(schema: Schema, encoding: str, frozen: Frozen = _never) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors an upload must carry under `encoding`, given the adapter's float32 `schema`."""
    if encoding == "fp32":
        return dict(schema)
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, (shape, dtype) in schema.items():
        shape = tuple(shape)
        if frozen(name):
            out[name] = (shape, dtype)
        elif encoding == "fp16":
            out[name] = (shape, "F16")
        else:
            out[name] = (shape, "I8")
            out[name + SCALE_SUFFIX] = (_scale_shape(shape, encoding), "F32")
    return out


def _int8(change: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray]:
    axis = _row_axis(change.shape, encoding)
    if axis is not None:
        moved = np.moveaxis(change, axis, 0).reshape(change.shape[axis], -1)
        scale = (np.abs(moved).max(axis=1) if moved.size else np.zeros(change.shape[axis])) / 127.0
        divisor = _per_slice(np.where(scale > 0, scale, 1.0), change.ndim, axis)
    else:
        scale = np.array([np.abs(change).max() / 127.0 if change.size else 0.0])
        divisor = scale[0] if scale[0] > 0 else 1.0
    q = np.clip(np.rint(change / divisor), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def encode(trained: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], encoding: str,
           frozen: Frozen = _never) -> dict[str, np.ndarray]:
    """The upload's tensors under `encoding`, from the trained tensors and the round's start."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown update encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    if encoding == "fp32":
        return dict(trained)
    out: dict[str, np.ndarray] = {}
    for name, value in trained.items():
        if frozen(name):
            out[name] = value
            continue
        change = np.asarray(value, dtype=np.float64) - np.asarray(start[name], dtype=np.float64)
        if encoding == "fp16":
            out[name] = np.clip(change, -_FP16_MAX, _FP16_MAX).astype(np.float16)
        else:
            out[name], out[name + SCALE_SUFFIX] = _int8(change, encoding)
    return out


def decode(wire: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], encoding: str,
           frozen: Frozen = _never) -> dict[str, np.ndarray]:
    """The float32 tensors an upload stands for (its schema already checked by `wire_schema`)."""
    if encoding == "fp32":
        return dict(wire)
    out: dict[str, np.ndarray] = {}
    for name, base in start.items():
        if frozen(name):
            out[name] = np.asarray(wire[name])
            continue
        value = np.asarray(wire[name])
        if encoding == "fp16":
            change = value.astype(np.float64)
        else:
            scale = np.asarray(wire[name + SCALE_SUFFIX], dtype=np.float64)
            axis = _row_axis(value.shape, encoding)
            scale = scale[0] if axis is None else _per_slice(scale, value.ndim, axis)
            change = value.astype(np.float64) * scale
        out[name] = (np.asarray(base, dtype=np.float64) + change).astype(np.asarray(base).dtype)
    return out


def bytes_per_value(encoding: str) -> float:
    """Wire bytes per trained value, scales aside."""
    return {"fp32": 4.0, "fp16": 2.0, "int8-tensor": 1.0, "int8-row": 1.0}[encoding]
