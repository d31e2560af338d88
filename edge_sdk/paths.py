"""Local paths built from names the coordinator sends (artifact names, build names and files,
run ids), checked to stay inside the folder meant for them (ARCHITECTURE.md, "Privacy").

The device trusts its coordinator for nothing it writes to disk: a broken or hostile
coordinator, or anyone on a plain-http path to it, must not be able to place a file outside
the device's state directory. A name is refused when it is absolute, has a drive letter or
colon, a backslash, a control character, an empty, `.` or `..` component; the joined path
is then resolved (following any symlink already on disk) and must still lie inside its root.
pathlib does the resolving; the few rules around it are written here because no small,
well-kept library checks a relative name against both POSIX and Windows readings.
"""

from __future__ import annotations

import re
from pathlib import Path

_MAX_NAME = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnsafePathError(RuntimeError):
    """A name from the coordinator would lead outside the folder meant for it."""


def _why_unsafe(name: object, nested: bool) -> str | None:
    if not isinstance(name, str) or not name:
        return "is empty"
    if len(name) > _MAX_NAME:
        return f"is longer than {_MAX_NAME} characters"
    if _CONTROL.search(name):
        return "holds a control character (NUL, newline, ...)"
    if "\\" in name:
        return "holds a backslash (a path separator on Windows)"
    if ":" in name:
        return "holds a colon (a drive letter or stream name on Windows)"
    if name.startswith("/"):
        return "is an absolute path"
    parts = name.split("/")
    if not nested and len(parts) > 1:
        return "holds a path separator where a single name belongs"
    if any(part in ("", ".", "..") for part in parts):
        return "has an empty, '.' or '..' component"
    return None


def _shown(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 120 else text[:117] + "..."


def _refuse(what: str, name: object, source: str, why: str) -> UnsafePathError:
    return UnsafePathError(
        f"refusing the {what} {_shown(name)} sent by the coordinator at {source}: its name {why}; nothing was "
        "written for it. A coordinator that sends such names is broken or hostile: stop this device, "
        "check the coordinator URL, and reach it over https")


def safe_join(root: Path, name: str, *, what: str, source: str, nested: bool = True,
              full_name: str | None = None) -> Path:
    """`root / name`, refused with UnsafePathError unless it stays inside `root`.

    `what` says what the name is ("artifact", "build file"), `source` who sent it (the
    coordinator's URL), `full_name` the name as sent when `name` is only its tail; they go
    into the message. `nested=False` admits one path component only.
    """
    shown = name if full_name is None else full_name
    why = _why_unsafe(name, nested)
    if why is not None:
        raise _refuse(what, shown, source, why)
    base = Path(root).resolve()
    resolved = (Path(root) / name).resolve()
    if base not in resolved.parents:
        raise _refuse(what, shown, source, f"resolves to {resolved}, outside {base} (through a symlink)")
    return Path(root) / name


def check_name(name: str, *, what: str, source: str) -> str:
    """`name` itself, refused with UnsafePathError unless it is one safe path component
    (for ids that become part of a file or folder name, e.g. the run id)."""
    why = _why_unsafe(name, nested=False)
    if why is not None:
        raise _refuse(what, name, source, why)
    return name
