"""The base error of the device runtime and build selection: what went wrong, why, and what to do."""

from __future__ import annotations


class EdgeRuntimeError(Exception):
    """Base of the runtime's errors. The message says what went wrong, why, and what to do."""

    def __init__(self, what: str, why: str | None = None, fix: str | None = None) -> None:
        self.what, self.why, self.fix = what, why, fix
        parts = [what + (f": {why}" if why else "")]
        if fix:
            parts.append(fix[:1].upper() + fix[1:])
        super().__init__(". ".join(p.rstrip(".") for p in parts) + ".")
