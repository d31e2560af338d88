"""On-device inference: one interface over llama.cpp (GGUF) and ONNX Runtime (ONNX builds).

Importing this package loads neither engine; each backend imports its library when a build
of its format is loaded.
"""

from common.selection import NoSuitableBuildError, rank_builds
from edge_sdk.runtime.base import (
    AdapterError,
    BackendUnavailableError,
    Chunk,
    ContextOverflowError,
    EdgeRuntimeError,
    GenerationResult,
    GpuUnavailableError,
    InferenceError,
    ModelFileError,
    Timings,
    UnsupportedBuildError,
)
from edge_sdk.runtime.generation import GenerationStream
from edge_sdk.runtime.loader import EdgeModel, check_files, read_build
from edge_sdk.runtime.router import CollaborativeRouter, RoutedAnswer
from edge_sdk.runtime.sampling import SamplingParams
from edge_sdk.runtime.selection import choose_build

__all__ = [
    "AdapterError",
    "BackendUnavailableError",
    "Chunk",
    "CollaborativeRouter",
    "ContextOverflowError",
    "EdgeModel",
    "EdgeRuntimeError",
    "GenerationResult",
    "GenerationStream",
    "GpuUnavailableError",
    "InferenceError",
    "ModelFileError",
    "NoSuitableBuildError",
    "RoutedAnswer",
    "SamplingParams",
    "Timings",
    "UnsupportedBuildError",
    "check_files",
    "choose_build",
    "rank_builds",
    "read_build",
]
