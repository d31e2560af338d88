"""Where cotune keeps what it makes once and reuses (pretrained demo models, the converted
Gemma checkpoint, benchmark builds): $COTUNE_CACHE, by default ~/.cache/cotune."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("COTUNE_CACHE", Path.home() / ".cache" / "cotune")).expanduser()
