"""Failpoints: named places where a coordinator can be made to crash, for fault tests.

`COTUNE_FAILPOINTS=aggregated,distilled` makes the process exit abruptly (as a SIGKILL
would leave it: no cleanup, no flush) when it reaches one of those points. Unset, a
failpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os

_ACTIVE = frozenset(p.strip() for p in os.environ.get("COTUNE_FAILPOINTS", "").split(",") if p.strip())


def failpoint(name: str) -> None:
    if name in _ACTIVE:
        os._exit(137)
