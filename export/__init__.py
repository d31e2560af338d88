"""Edge builds from an HF checkpoint (+ LoRA adapter): GGUF, GGUF LoRA, ONNX, with parity gates.

`export_builds` is the entry point; heavy libraries load only when it runs.
`export_builds_isolated` runs it in a child process, where a native crash cannot reach the caller.
"""

from export.errors import ExportError, ParityError, UnsupportedModelError
from export.isolated import export_builds_isolated
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
    "export_builds_isolated",
    "parse_targets",
]
