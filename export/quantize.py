"""Weight quantization: GGUF through llama.cpp's own quantizer, ONNX through onnxruntime's tools."""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
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


def quantize_onnx_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 (per-channel weights, activations quantized at run time)."""
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


def quantize_onnx_int4(src: Path, dst: Path, *, block_size: int = 32, accuracy_level: int | None = 4,
                       head_bits: int = 8, symmetric: bool = False) -> None:
    """Weight-only int4 (MatMulNBits / GatherBlockQuantized) of every MatMul and Gather: the embedding too.

    `head_bits=8` keeps the (untied) output head at 8 bits, as llama.cpp's k-quant mixes keep output.weight
    higher; with asymmetric blocks this took Gemma 3 270M's perplexity change from +81% to +45% here.
    """
    import onnx

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # That module runs logging.basicConfig(level=INFO) on import, which would print every node it visits.
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    model = onnx.load(str(src))
    head = _head_matmuls(model) if head_bits != 4 else []
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
        op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=head, algo_config=config)
    quantizer.process()
    if head:
        wide = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                            accuracy_level=accuracy_level, op_types_to_quantize=(), bits=head_bits)
        quantizer = MatMulNBitsQuantizer(quantizer.model.model, nodes_to_include=head, algo_config=wide)
        quantizer.process()
    external = _onnx_bytes(src) // 7 > _EXTERNAL_DATA_BYTES
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=external)


def onnx_files(model_path: Path) -> list[Path]:
    """model.onnx and its external data file(s), if any."""
    return sorted(f for f in model_path.parent.iterdir() if f.name.startswith(model_path.name))
