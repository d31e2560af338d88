"""A GGUF made elsewhere (a published file) as a build directory: model.gguf and its manifest.

For files that have no checkpoint to export from, or whose own quantization is the point
(Gemma 3 270M as its package ships it). No parity gate: there is no torch model here to
measure against, so the manifest's parity figures stay empty.
"""

from __future__ import annotations

from pathlib import Path

from common import __version__
from common.dirs import link_or_copy, staged_dir
from common.manifest import BuildManifest, build_files
from export.errors import ExportError

MODEL_FILE = "model.gguf"


def gguf_build(gguf: Path, out_dir: Path, *, quantization: str, architecture: str, base_model: str,
               context_length: int = 0, requantize: bool = False, threads: int | None = None) -> BuildManifest:
    """Put `gguf` at `out_dir/model.gguf` with a manifest; `out_dir` is replaced as a whole.

    `quantization` names the file's own type, or with `requantize` the type to convert it to
    through llama.cpp (see export.quantize.quantize_gguf: the accuracy stays the source's).
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ExportError(f"{gguf}: no such GGUF file")
    out = Path(out_dir)
    with staged_dir(out) as tmp:
        if requantize:
            from export.quantize import quantize_gguf

            quantize_gguf(gguf, tmp / MODEL_FILE, quantization, threads, requantize=True)
        else:
            link_or_copy(gguf, tmp / MODEL_FILE)
        manifest = BuildManifest(format="gguf", quantization=quantization, architecture=architecture,
                                 model_file=MODEL_FILE, base_model=base_model, context_length=context_length,
                                 files=build_files(tmp), cotune_version=__version__)
        manifest.write(tmp)
    return manifest
