"""One simulated device's round: what runs as a Ray task (or in process, with `--no-ray`).

A task gets what a real device gets and nothing of the coordinator: the RoundInfo JSON that
`GET /v1/runs/{run}/rounds/current` answers, the artifacts' bytes (a Ray object per digest, or
a file the worker can read), its own records, and the files it kept in its state folder after
earlier rounds (its local-DP ledger, its own SLM's adapters). It runs the task kind's handler
exactly as `cotune edge join` does and returns the update body the worker would upload, the
digests it fetched (what a real device downloads) and its state files for the next round, so a
device may land on any worker, on any node, each round.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.digest import file_sha256
from common.protocol import ArtifactRef, RoundInfo
from common.records import TaskRecord
from edge_sdk.handlers import DeviceContext, handler_for
from edge_sdk.update_encoding import encode_payload
from edge_sdk.worker import ArtifactCache, encode_update

# Folders of a device's state that are remade from artifacts every round, never carried.
_REMADE = ("model", "cache")


@dataclass
class DeviceTask:
    name: str
    round_info: str  # RoundInfo as JSON, as the coordinator answers it
    records: list[TaskRecord]
    # sha256 -> the artifact: a Ray ObjectRef of its bytes, or the path of a file the worker can read.
    blobs: dict[str, Any]
    # The device's state files from its earlier rounds: path relative to its state folder -> bytes.
    state: dict[str, bytes] = field(default_factory=dict)
    eval_records: list[TaskRecord] = field(default_factory=list)
    # Where the worker keeps blobs (shared by the devices it runs) and device folders; None: its temp dir.
    scratch: str | None = None
    simulation_id: str = "simulation"
    threads: int = 1


@dataclass
class DeviceResult:
    name: str
    body: bytes  # the update, encoded as the worker uploads it
    fetched: list[str]  # digests of the artifacts the handler read, in order
    state: dict[str, bytes]
    seconds: float


class ShippedBlobs:
    """Stands in for CoordinatorClient.download: the bytes come from the task, checked against
    the digest and size the RoundInfo lists, as the real client checks a download."""

    def __init__(self, blobs: dict[str, Any]) -> None:
        self.blobs = blobs

    def download(self, ref: ArtifactRef, dest: Path) -> Path:
        if ref.sha256 not in self.blobs:
            raise RuntimeError(f"artifact {ref.name} ({ref.sha256[:12]}) was not shipped with the task; "
                               "the device may read only its round's artifacts")
        source = self.blobs[ref.sha256]
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{ref.sha256[:12]}.", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            if isinstance(source, (str, os.PathLike)):
                os.close(fd)
                shutil.copyfile(source, tmp)
            else:
                import ray

                with os.fdopen(fd, "wb") as handle:
                    handle.write(ray.get(source))
            digest, size = file_sha256(tmp), tmp.stat().st_size
            if digest != ref.sha256 or size != ref.size:
                raise RuntimeError(f"artifact {ref.name}: got {size} bytes with sha256 {digest[:12]}, the round "
                                   f"lists {ref.size} bytes with {ref.sha256[:12]}")
            os.replace(tmp, dest)  # whole or absent: workers on one node share the folder
        finally:
            tmp.unlink(missing_ok=True)
        return dest


class RecordingCache(ArtifactCache):
    """The worker's artifact cache, shared by the devices a worker node runs, noting what this
    device read: on a real device each of those is a download unless it held it already."""

    def __init__(self, root: Path, blobs: ShippedBlobs) -> None:
        super().__init__(root, blobs)  # type: ignore[arg-type]
        self.fetched: list[str] = []

    def fetch(self, ref: ArtifactRef) -> Path:
        if ref.sha256 not in self.fetched:
            self.fetched.append(ref.sha256)
        return super().fetch(ref)


def run_device(task: DeviceTask) -> DeviceResult:
    """The round's work for one device; the same task gives the same update bytes anywhere."""
    started = time.perf_counter()
    info = RoundInfo.model_validate_json(task.round_info)
    root = Path(task.scratch or tempfile.gettempdir()) / "cotune-simulate" / task.simulation_id
    (root / "devices").mkdir(parents=True, exist_ok=True)
    state_dir = Path(tempfile.mkdtemp(prefix=f"{task.name}-r{info.round}-", dir=root / "devices"))
    try:
        restore_state(state_dir, task.state)
        cache = RecordingCache(root, ShippedBlobs(task.blobs))
        ctx = DeviceContext(records=task.records, eval_records=task.eval_records, cache=cache, state_dir=state_dir,
                            say=lambda _msg: None, progress=False, coordinator="(simulation)")
        with torch_threads(task.threads):
            payload = handler_for(info.task.kind)(ctx).run(info)
        body = encode_update(encode_payload(payload, info, cache), info.task.kind)
        return DeviceResult(task.name, body, cache.fetched, collect_state(state_dir),
                            time.perf_counter() - started)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def restore_state(state_dir: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = state_dir / rel
        # The names are our own (collect_state's), but a device folder is no place to trust a path.
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"state file {rel!r} is not a path inside the device's folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def collect_state(state_dir: Path) -> dict[str, bytes]:
    """Every file the handler kept, less the model folders it remakes from artifacts."""
    out: dict[str, bytes] = {}
    for path in sorted(state_dir.rglob("*")):
        rel = path.relative_to(state_dir)
        if rel.parts[0] in _REMADE or not path.is_file() or path.is_symlink():
            continue
        out[rel.as_posix()] = path.read_bytes()
    return out


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Train with `threads` torch threads whatever the process had, so a device's update has the
    same bits in a Ray worker and in process (float sums depend on how work is split)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)
