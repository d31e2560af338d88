"""Task records (`{"prompt": ..., "response": ...}` JSONL) and their strict reader/writer."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TaskRecord:
    """One supervised example: the loss is on `response` only (ARCHITECTURE.md, "Algorithms")."""

    prompt: str
    response: str
    domain: str | None = None

    def to_dict(self) -> dict[str, str]:
        out = {"prompt": self.prompt, "response": self.response}
        if self.domain is not None:
            out["domain"] = self.domain
        return out


def _bad(path: Path, line_no: int, what: str) -> ValueError:
    return ValueError(
        f"{path}:{line_no}: {what}. Each line must be a JSON object like "
        '{"prompt": "...", "response": "..."} (optional "domain"); fix or remove that line.'
    )


def read_jsonl(path: str | os.PathLike[str]) -> list[TaskRecord]:
    """Read task records, one JSON object per line; blank lines are skipped.

    Raises ValueError naming the file and line for any malformed record, so a user can
    fix their data instead of training on half of it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass the path of a JSONL file of task records.")
    records: list[TaskRecord] = []
    with path.open("r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _bad(
                    path, line_no, f"not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise _bad(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
            for key in ("prompt", "response"):
                if key not in obj:
                    raise _bad(path, line_no, f'missing "{key}"')
                if not isinstance(obj[key], str):
                    raise _bad(
                        path, line_no, f'"{key}" must be a string, got {type(obj[key]).__name__}'
                    )
            domain = obj.get("domain")
            if domain is not None and not isinstance(domain, str):
                raise _bad(path, line_no, f'"domain" must be a string, got {type(domain).__name__}')
            records.append(TaskRecord(obj["prompt"], obj["response"], domain))
    if not records:
        raise ValueError(
            f"{path}: the file holds no records; write at least one line like "
            '{"prompt": "...", "response": "..."}.'
        )
    return records


def write_jsonl(path: str | os.PathLike[str], records: Iterable[TaskRecord]) -> None:
    """Write records as JSONL atomically: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            for record in records:
                handle.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
