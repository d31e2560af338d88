"""Directories that appear whole: build in a sibling staging folder, then rename into place.

Checkpoints, builds and caches are read by other processes (and survive crashes), so a
reader must find the old directory or the complete new one, never a half-written mix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (model files run to gigabytes), copying where links cannot go."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def staging_dir(dest: Path) -> Path:
    """A fresh empty directory beside `dest` (same file system, so the final rename is atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))


def replace_dir(staged: Path, dest: Path) -> Path:
    """Move the finished `staged` directory to `dest`, replacing whatever is there."""
    if dest.exists():
        # os.replace cannot put a directory over a non-empty one: swap through a backup name.
        backup = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        backup.rmdir()
        os.rename(dest, backup)
        os.rename(staged, dest)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(staged, dest)
    return dest


@contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    """Yield a staging directory that replaces `dest` when the block ends, or vanishes if it raises."""
    tmp = staging_dir(dest)
    try:
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
