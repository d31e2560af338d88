"""The errors an export raises: each message says what is wrong, why, and what to do."""

from __future__ import annotations

from typing import Any


class ExportError(ValueError):
    """Bad input or a failed export. Nothing has been left in the output directory."""


class UnsupportedModelError(ExportError):
    """The model (architecture, setting or tokenizer) has no path to the requested format."""


class ParityError(ExportError):
    """A build crossed a parity bound: `figures` holds what it measured, `passed` the figures of the
    builds that had passed before it (by target, e.g. "gguf:q4_k_m"), none of which were kept."""

    def __init__(self, message: str, figures: dict[str, Any] | None = None,
                 passed: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.figures = figures or {}
        self.passed = passed or {}

    def __reduce__(self) -> tuple[Any, ...]:
        # keeps the figures when the error crosses a process boundary (export/isolated.py)
        return type(self), (self.args[0], self.figures, self.passed)
