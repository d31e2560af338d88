"""Edge builds from an HF checkpoint (+ LoRA adapter): GGUF, GGUF LoRA, ONNX, with parity gates.

`export_builds` is the entry point; heavy libraries load only when it runs.
"""

from export.errors import ExportError, ParityError, UnsupportedModelError
from export.parity import ParityBounds
from export.pipeline import BuildResult, export_builds
from export.targets import Target, parse_targets

__all__ = [
    "BuildResult",
    "ExportError",
    "ParityBounds",
    "ParityError",
    "Target",
    "UnsupportedModelError",
    "export_builds",
    "parse_targets",
]
