"""Build targets such as "gguf:q4_k_m", "gguf-lora", "onnx:int4": parsing and naming."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from export.errors import ExportError

# llama.cpp file types (enum llama_ftype) for the quantizations we offer.
GGUF_FTYPES: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "q8_0": 7,
    "q4_0": 2,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_m": 17,
    "q6_k": 18,
}
FLOAT_QUANTS = frozenset({"f32", "f16", "fp32"})
ONNX_QUANTS = ("fp32", "int8", "int4")
DEFAULT_QUANT = {"gguf": "f16", "gguf-lora": "f16", "onnx": "fp32"}
_ALIASES = {"onnx": {"f32": "fp32", "float32": "fp32", "q8": "int8", "q4": "int4"},
            "gguf": {"float32": "f32", "float16": "f16", "fp16": "f16", "fp32": "f32"}}


@dataclass(frozen=True)
class Target:
    """One build: a format and a quantization (for gguf-lora, the quantization of its base)."""

    format: str
    quant: str

    @property
    def name(self) -> str:
        """The build's directory name, e.g. gguf-q4_k_m, gguf-lora-f16, onnx-int4."""
        return f"{self.format}-{self.quant}"

    @property
    def is_float(self) -> bool:
        return self.quant in FLOAT_QUANTS

    @property
    def bits(self) -> int:
        """Weight bits, for picking parity bounds: 32, 16, 8 or 4 (k-quants count as 4 to 6 -> 4)."""
        if self.quant in ("f32", "fp32"):
            return 32
        if self.quant == "f16":
            return 16
        if self.quant in ("q8_0", "int8", "q6_k"):
            return 8
        return 4

    def __str__(self) -> str:
        return f"{self.format}:{self.quant}"


def _allowed(fmt: str) -> tuple[str, ...]:
    return ONNX_QUANTS if fmt == "onnx" else tuple(GGUF_FTYPES)


def parse_target(spec: str) -> Target:
    """'gguf:q4_k_m' -> Target('gguf', 'q4_k_m'); a bare format takes its default quantization."""
    text = spec.strip().lower()
    fmt, _, quant = text.partition(":")
    fmt = fmt.strip()
    if fmt not in DEFAULT_QUANT:
        raise ExportError(
            f"unknown export target {spec!r}: the format must be one of {', '.join(DEFAULT_QUANT)} "
            "(e.g. gguf:q4_k_m, gguf-lora, onnx:int4)"
        )
    quant = quant.strip() or DEFAULT_QUANT[fmt]
    quant = _ALIASES["onnx" if fmt == "onnx" else "gguf"].get(quant, quant)
    if quant not in _allowed(fmt):
        raise ExportError(
            f"unknown quantization {quant!r} for {fmt}: choose one of {', '.join(_allowed(fmt))}"
        )
    return Target(fmt, quant)


def parse_targets(specs: str | Target | Iterable[str | Target]) -> list[Target]:
    """A comma-separated string or a list of specs/Targets -> unique Targets in the given order."""
    if isinstance(specs, (str, Target)):
        specs = [specs]
    items: list[Target] = []
    for spec in specs:
        if isinstance(spec, Target):
            parsed = [parse_target(str(spec))]
        else:
            parsed = [parse_target(part) for part in str(spec).split(",") if part.strip()]
        for target in parsed:
            if target not in items:
                items.append(target)
    if not items:
        raise ExportError("no export targets given; pass e.g. --to gguf:q4_k_m,onnx:int4")
    return items
