"""cotune edge SDK: the device side of federated co-tuning.

Importing this package is cheap: heavy libraries (torch, transformers, peft, llama_cpp,
onnxruntime) load only inside the functions that train or run models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common import __version__

if TYPE_CHECKING:
    from edge_sdk.runtime import EdgeModel

__all__ = ["EdgeModel", "__version__"]


def __getattr__(name: str) -> Any:
    # `from edge_sdk import EdgeModel` without importing the runtime for every SDK user.
    if name == "EdgeModel":
        from edge_sdk.runtime import EdgeModel

        return EdgeModel
    raise AttributeError(f"module 'edge_sdk' has no attribute {name!r}")
