"""Files only their owner may read (a device's credentials, the coordinator's tokens),
private from the first byte."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, text: str) -> Path:
    """Replace `path` with `text`, readable and writable by its owner only.

    The file is created with mode 0600 by `os.open` (O_CREAT | O_EXCL), never written first
    and tightened after, so there is no moment in which another user could read the token;
    it is written beside `path`, flushed to disk and renamed over it, so a crash leaves the
    old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a stale copy from a crash: O_EXCL must create the file itself
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
