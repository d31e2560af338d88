"""Splitting one task JSONL into the private data of N simulated devices.

Three schemes, named by a spec string (`parse_partition`):

- `iid`: a seeded shuffle dealt into N parts whose sizes differ by at most one;
- `field:NAME`: records grouped by the value of a field (e.g. `domain`); with at least as many
  devices as values, each device holds one value (values dealt round-robin, a value's records
  split evenly among its devices); with fewer, each device holds whole values;
- `dirichlet:ALPHA[:FIELD]`: label skew as in Hsu et al. (arXiv 1909.06335): for each value of
  FIELD (default `domain`) the shares of the N devices are drawn from Dirichlet(ALPHA), so a
  small ALPHA gives each device few values and a large one approaches IID. Draws are repeated
  (at most 100 times) until every device holds at least one record.

A partition is a list of index lists into the records, a pure function of (records, spec, N,
seed): the same seed gives the same split on every machine (numpy's PCG64 and Python's
`random.Random`, both stable across versions).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.records import TaskRecord, read_jsonl

SCHEMES = ("iid", "field:NAME", "dirichlet:ALPHA", "dirichlet:ALPHA:FIELD")
DEFAULT_FIELD = "domain"
_DIRICHLET_TRIES = 100


class PartitionError(ValueError):
    """The spec or the data cannot give the partition asked for; the message says what to change."""


@dataclass(frozen=True)
class PartitionSpec:
    scheme: str  # "iid" | "field" | "dirichlet"
    field: str | None = None
    alpha: float | None = None

    def __str__(self) -> str:
        if self.scheme == "iid":
            return "iid"
        if self.scheme == "field":
            return f"field:{self.field}"
        return f"dirichlet:{self.alpha:g}:{self.field}"


@dataclass(frozen=True)
class Row:
    """One record and the JSON object it was read from (for fields TaskRecord does not keep)."""

    record: TaskRecord
    fields: dict[str, Any]


def parse_partition(text: str) -> PartitionSpec:
    """`iid`, `field:NAME` or `dirichlet:ALPHA[:FIELD]`; PartitionError says what a bad one lacks."""
    parts = text.strip().split(":")
    scheme = parts[0].lower()
    hint = f"write one of {', '.join(SCHEMES)} (e.g. dirichlet:0.5 or field:domain)"
    if scheme == "iid" and len(parts) == 1:
        return PartitionSpec("iid")
    if scheme == "field" and len(parts) == 2 and parts[1]:
        return PartitionSpec("field", field=parts[1])
    if scheme == "dirichlet" and len(parts) in (2, 3):
        try:
            alpha = float(parts[1])
        except ValueError:
            raise PartitionError(f"partition {text!r}: alpha {parts[1]!r} is not a number; {hint}") from None
        if not 0 < alpha < float("inf"):
            raise PartitionError(f"partition {text!r}: alpha must be a finite number > 0 (smaller is more "
                                 "skewed, e.g. 0.1; large approaches iid, e.g. 100)")
        field = parts[2] if len(parts) == 3 else DEFAULT_FIELD
        if not field:
            raise PartitionError(f"partition {text!r}: empty field name; {hint}")
        return PartitionSpec("dirichlet", field=field, alpha=alpha)
    raise PartitionError(f"unknown partition {text!r}; {hint}")


def read_rows(path: str | Path) -> list[Row]:
    """The file's records (read_jsonl's checks and messages) with their JSON objects."""
    records = read_jsonl(path)
    with Path(path).open("r", encoding="utf-8") as handle:
        objects = [json.loads(line) for line in handle if line.strip()]
    return [Row(r, o) for r, o in zip(records, objects, strict=True)]


def rows_of(records: Sequence[TaskRecord]) -> list[Row]:
    """Rows for records already in memory (their fields are what TaskRecord.to_dict writes)."""
    return [Row(r, r.to_dict()) for r in records]


def partition(rows: Sequence[Row], spec: PartitionSpec, num_devices: int, seed: int = 0) -> list[list[int]]:
    """Indices into `rows`, one list per device, each non-empty and in file order."""
    if num_devices < 1:
        raise PartitionError(f"--devices must be at least 1, got {num_devices}")
    if len(rows) < num_devices:
        raise PartitionError(f"{len(rows)} records cannot give {num_devices} devices one record each; "
                             "simulate fewer devices or bring more data")
    if spec.scheme == "iid":
        parts = _iid(len(rows), num_devices, seed)
    elif spec.scheme == "field":
        parts = _by_field(_values(rows, spec.field or DEFAULT_FIELD), num_devices, seed)
    else:
        parts = _dirichlet(_values(rows, spec.field or DEFAULT_FIELD), num_devices, spec.alpha or 1.0, seed)
    return [sorted(p) for p in parts]


def describe(rows: Sequence[Row], parts: Sequence[Sequence[int]], spec: PartitionSpec) -> dict[str, Any]:
    """What the split gave: sizes and, for field schemes, each device's count per value."""
    sizes = [len(p) for p in parts]
    out: dict[str, Any] = {"scheme": str(spec), "devices": len(parts), "records": sum(sizes),
                           "size_min": min(sizes), "size_max": max(sizes), "sizes": sizes}
    if spec.field is not None:
        values = _values(rows, spec.field)
        out["values"] = [dict(sorted(Counter(values[i] for i in p).items())) for p in parts]
    return out


def _values(rows: Sequence[Row], field: str) -> list[str]:
    """Each row's value of `field` as a grouping key; PartitionError for a row that lacks it."""
    missing = [i for i, row in enumerate(rows) if row.fields.get(field) is None]
    if missing:
        present = sorted({k for row in rows[:50] for k in row.fields})
        lines = ", ".join(str(i + 1) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise PartitionError(f"{len(missing)} of {len(rows)} records have no field {field!r} (records {lines}); "
                             f"the records have {present}. Add the field to every record or partition by another "
                             "(iid needs none)")
    out = []
    for row in rows:
        value = row.fields[field]
        out.append(value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    return out


def _deal(indices: list[int], n: int) -> list[list[int]]:
    """Consecutive chunks of near-equal size (the first len % n get one more)."""
    base, extra = divmod(len(indices), n)
    out, start = [], 0
    for k in range(n):
        size = base + (1 if k < extra else 0)
        out.append(indices[start:start + size])
        start += size
    return out


def _iid(count: int, n: int, seed: int) -> list[list[int]]:
    order = list(range(count))
    random.Random(f"cotune-partition:iid:{seed}").shuffle(order)
    return _deal(order, n)


def _groups(values: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, value in enumerate(values):
        groups.setdefault(value, []).append(i)
    return dict(sorted(groups.items()))


def _by_field(values: Sequence[str], n: int, seed: int) -> list[list[int]]:
    groups = _groups(values)
    keys = list(groups)
    rng = random.Random(f"cotune-partition:field:{seed}")
    parts: list[list[int]] = [[] for _ in range(n)]
    if n <= len(keys):
        for j, key in enumerate(keys):
            parts[j % n].extend(groups[key])
        return parts
    for key in keys:
        holders = [k for k in range(n) if keys[k % len(keys)] == key]
        members = list(groups[key])
        if len(members) < len(holders):
            raise PartitionError(f"value {key!r} has {len(members)} records for {len(holders)} devices; simulate "
                                 f"at most {len(keys)} devices per value's smallest group, or partition iid")
        rng.shuffle(members)
        for k, chunk in zip(holders, _deal(members, len(holders)), strict=True):
            parts[k] = chunk
    return parts


def _dirichlet(values: Sequence[str], n: int, alpha: float, seed: int) -> list[list[int]]:
    import numpy as np

    groups = _groups(values)
    rng = np.random.Generator(np.random.PCG64(seed))
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(n)]
        for members in groups.values():
            shuffled = [members[i] for i in rng.permutation(len(members))]
            shares = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(int)
            for k, chunk in enumerate(np.split(np.array(shuffled, dtype=np.int64), cuts)):
                parts[k].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) > 0:
            return parts
    raise PartitionError(f"Dirichlet({alpha:g}) left a device without records in {_DIRICHLET_TRIES} draws over "
                         f"{len(values)} records and {n} devices; raise alpha, simulate fewer devices or bring more "
                         "data")
