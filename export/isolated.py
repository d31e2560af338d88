"""export_builds in a child process, for the coordinator and the device.

An export drives native code (llama.cpp's quantizer and runtime, onnxruntime) that can die of a
signal rather than raise; in the caller's process that would take the coordinator, or a device's
join loop, down with it. Here the export runs in a spawned child: its errors come back as they
were raised, and a child that dies is retried once (native crashes seen so far were not
repeatable) and then reported as an ExportError naming the signal. See ARCHITECTURE.md (edge builds).

The standard library's ProcessPoolExecutor would hide how the child died (BrokenProcessPool
carries no exit code), hence a plain Process and a pipe.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from export.errors import ExportError

log = logging.getLogger("cotune.export")


def _child(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    try:
        outcome: tuple[str, Any] = ("ok", fn(*args, **kwargs))
    except Exception as exc:  # returned to the parent, which raises it there
        outcome = ("error", exc)
    try:
        conn.send(outcome)
    except (pickle.PicklingError, TypeError, AttributeError):
        conn.send(("error", ExportError(f"the export failed: {type(outcome[1]).__name__}: {outcome[1]}")))
    finally:
        conn.close()


def _how_it_died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def _attempt(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Any]:
    """("ok", results), ("error", exception) or ("died", how)."""
    ctx = multiprocessing.get_context("spawn")  # no fork: the parent holds threads and sockets
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, fn, args, kwargs), name="cotune-export", daemon=True)
    proc.start()
    sender.close()
    try:
        while True:
            if receiver.poll(0.5):
                try:
                    outcome = receiver.recv()
                except EOFError:  # the child closed the pipe without a word: it died sending
                    break
                proc.join()
                return outcome
            if not proc.is_alive():
                if receiver.poll(0):  # it sent, then exited, between our two looks
                    continue
                break
        proc.join()
        return "died", _how_it_died(proc.exitcode)
    finally:
        receiver.close()
        if proc.is_alive():
            proc.kill()
            proc.join()


def run_isolated(fn: Callable[..., Any], *args: Any, retries: int = 1, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in a spawned child (fn importable by name; arguments and result must
    pickle). An exception it raises is raised here; a child that dies is tried again `retries`
    times, then an ExportError says how it died."""
    deaths: list[str] = []
    for _ in range(retries + 1):
        kind, value = _attempt(fn, args, kwargs)
        if kind == "ok":
            if deaths:
                log.warning("the exporter process died (%s) and the retry succeeded", "; ".join(deaths))
            return value
        if kind == "error":
            raise value
        deaths.append(value)
        log.warning("the exporter process died of %s", value)
    raise ExportError(f"the exporter process died ({'; '.join(deaths)}) on every try, in native code (llama.cpp "
                      "or onnxruntime); nothing was built and this process is unaffected. Try again, or leave out "
                      "the target whose build the log names last")


def export_builds_isolated(*args: Any, retries: int = 1, **kwargs: Any) -> list[Any]:
    """`export.pipeline.export_builds(*args, **kwargs)` in a child process. What a dead child
    leaves beside the output directory (a `.name.tmp-*` staging folder) is the caller's to remove."""
    from export.pipeline import export_builds

    return list(run_isolated(export_builds, *args, retries=retries, **kwargs))
