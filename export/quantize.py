"""Weight quantization: GGUF through llama.cpp's own quantizer, ONNX through onnxruntime's tools."""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.errors import ExportError
from export.targets import GGUF_FTYPES

K_QUANT_TYPES = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"})
# Quantized ONNX models above this size go to an external data file (protobuf stops at 2 GiB).
_EXTERNAL_DATA_BYTES = 1_500_000_000


@contextmanager
def native_output_to(log: Path) -> Iterator[None]:
    """Send what native code writes to fds 1 and 2 (llama.cpp's quantizer logs every tensor) into a file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with log.open("ab") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int | None = None, *, requantize: bool = False) -> None:
    """llama.cpp's llama_model_quantize from an f32/f16 GGUF to `quant` (q8_0, q4_k_m, ...).

    `requantize` takes an already quantized source (and allows f16/f32 targets): its weights are
    dequantized first, so the result has the size and speed of `quant` but not its accuracy.
    """
    import ctypes

    import llama_cpp

    allowed = [q for q in GGUF_FTYPES if requantize or q not in ("f32", "f16")]
    if quant not in allowed:
        raise ExportError(f"cannot quantize to {quant!r}; choose one of {', '.join(allowed)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_FTYPES[quant]
    params.nthread = int(threads or 0)
    params.allow_requantize = requantize
    log = dst.with_name(dst.name + ".log")
    with native_output_to(log):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    text = log.read_text(errors="replace")
    log.unlink()
    if rc != 0 or not dst.is_file():
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise ExportError(f"llama.cpp could not quantize {src.name} to {quant} (status {rc}): {tail}")


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type the file holds, e.g. {'Q4_K': 27, 'Q5_0': 81, 'F32': 109}."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def kquant_fallbacks(path: Path) -> list[str]:
    """2-D weights a k-quant file stores in a non-k type: llama.cpp falls back when a row is not a multiple of 256."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return [t.name for t in reader.tensors
            if len(t.shape) == 2 and t.tensor_type.name not in K_QUANT_TYPES and t.tensor_type.name != "F32"]


def _onnx_bytes(model_path: Path) -> int:
    return sum(f.stat().st_size for f in model_path.parent.iterdir() if f.name.startswith(model_path.name))


def quantize_onnx_dynamic_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 (per-channel weights, activations quantized at run time): onnx:int8 before the
    weight-only builds, kept for the quantization benchmark's comparison."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = _onnx_bytes(src) // 4 > _EXTERNAL_DATA_BYTES
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice goes to the root logger
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=external)
    finally:
        root.setLevel(level)


def _head_matmuls(model: Any) -> list[str]:
    """The MatMul node(s) that produce the graph's logits output (the untied output head)."""
    outputs = {o.name for o in model.graph.output if "logits" in o.name}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and set(n.output) & outputs]


@dataclass(frozen=True)
class WeightQuant:
    """Weight-only block quantization of an ONNX decoder (MatMulNBits / GatherBlockQuantized):
    every MatMul and the embedding Gather get `bits`, the output head `head_bits`; activations stay
    float. `accuracy_level` is onnxruntime's compute type for MatMulNBits (None: float, as the
    weights were; 4: int8 activations, faster and less exact). `algorithm` "rtn" rounds each block
    to its nearest grid point (asymmetric unless `symmetric`); "hqq" fits each block's scale and
    zero point by half-quadratic optimisation (onnxruntime's HQQ quantizer, 4 bits only)."""

    bits: int = 4
    block_size: int = 32
    accuracy_level: int | None = None
    head_bits: int = 8
    symmetric: bool = False
    algorithm: str = "rtn"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8) or self.head_bits not in (4, 8):
            raise ValueError(f"bits and head_bits must be 4 or 8, got {self.bits} and {self.head_bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.algorithm not in ("rtn", "hqq") or (self.algorithm == "hqq" and self.bits != 4):
            raise ValueError(f"algorithm must be rtn, or hqq at 4 bits; got {self.algorithm} at {self.bits} bits")


def _quiet_quantizer_import() -> Any:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import onnxruntime.quantization.matmul_nbits_quantizer as nbits

    # That module runs logging.basicConfig(level=INFO) on import, which would print every node it visits.
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    return nbits


def quantize_onnx_weights(src: Path, dst: Path, quant: WeightQuant) -> None:
    """Weight-only block quantization of every MatMul and Gather (the embedding too), the untied output
    head at `quant.head_bits`: llama.cpp's k-quant mixes keep output.weight wider for the same reason."""
    import onnx

    nbits = _quiet_quantizer_import()
    model = onnx.load(str(src))
    head = _head_matmuls(model) if quant.head_bits != quant.bits else []
    axes = (("MatMul", 0), ("Gather", 1))
    if quant.algorithm == "hqq":
        config: Any = nbits.HQQWeightOnlyQuantConfig(block_size=quant.block_size, bits=quant.bits,
                                                      op_types_to_quantize=("MatMul", "Gather"), quant_axes=axes)
    else:
        config = nbits.DefaultWeightOnlyQuantConfig(
            block_size=quant.block_size, is_symmetric=quant.symmetric, accuracy_level=quant.accuracy_level,
            op_types_to_quantize=("MatMul", "Gather"), quant_axes=axes, bits=quant.bits)
    quantizer = nbits.MatMulNBitsQuantizer(model, nodes_to_exclude=head, algo_config=config)
    quantizer.process()
    if head:
        wide = nbits.DefaultWeightOnlyQuantConfig(block_size=quant.block_size, is_symmetric=quant.symmetric,
                                                  accuracy_level=quant.accuracy_level, op_types_to_quantize=(),
                                                  bits=quant.head_bits)
        quantizer = nbits.MatMulNBitsQuantizer(quantizer.model.model, nodes_to_include=head, algo_config=wide)
        quantizer.process()
    external = _onnx_bytes(src) * quant.bits // 32 > _EXTERNAL_DATA_BYTES
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=external)


def onnx_files(model_path: Path) -> list[Path]:
    """model.onnx and its external data file(s), if any."""
    return sorted(f for f in model_path.parent.iterdir() if f.name.startswith(model_path.name))
