"""Exports run in a child process: a crash in native code ends the child, not the caller; the
exporter's own errors (ParityError with its figures) arrive as they were raised."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from export.errors import ExportError, ParityError
from export.isolated import run_isolated


def _segfault() -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV, as a native exporter bug would


def _crash_once(marker: str) -> str:
    if not Path(marker).exists():
        Path(marker).write_text("crashed once")
        os.abort()
    return f"pid {os.getpid()} built it"


def _parity_fails() -> None:
    raise ParityError("gguf:q8_0 failed its parity check", {"top1": 0.5}, passed={"gguf:f16": {"top1": 1.0}})


def test_a_child_that_keeps_dying_is_an_export_error_naming_the_signal() -> None:
    with pytest.raises(ExportError, match=r"died \(signal SIGSEGV; signal SIGSEGV\) on every try"):
        run_isolated(_segfault, retries=1)
    # and this process is still here to say so


def test_a_child_that_dies_once_is_retried(tmp_path: Path) -> None:
    result = run_isolated(_crash_once, str(tmp_path / "marker"))
    assert result.startswith("pid ") and not result.endswith(f"pid {os.getpid()} built it")
    assert (tmp_path / "marker").exists()


def test_the_exporters_errors_arrive_with_their_figures() -> None:
    with pytest.raises(ParityError) as err:
        run_isolated(_parity_fails)
    assert err.value.figures == {"top1": 0.5} and err.value.passed == {"gguf:f16": {"top1": 1.0}}
