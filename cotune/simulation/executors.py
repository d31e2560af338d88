"""Where the devices' tasks run: Ray tasks (a local Ray started here, or a cluster), or this
process one after another (`--no-ray`: the same tasks, for a machine without Ray and for
checking that Ray changes nothing)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cotune.simulation.device import DeviceResult, DeviceTask, run_device

log = logging.getLogger("cotune.simulate")


class Executor(Protocol):
    name: str
    # Where tasks keep blobs and device folders, as the worker sees it (None: its temp dir).
    scratch: str | None

    def blob(self, digest: str, path: Path) -> Any:
        """What a task is sent for the artifact `digest` stored at `path`."""

    def keep_only(self, digests: set[str]) -> None:
        """Let go of shipped artifacts not among `digests` (earlier rounds' adapters)."""

    def run(self, tasks: Sequence[DeviceTask]) -> Iterator[tuple[int, DeviceResult]]:
        """Run every task; yield (its index, its result) as each finishes."""

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Every device in this process, one at a time; artifacts are read from the store's files."""

    name = "local"

    def __init__(self, scratch: Path) -> None:
        self.scratch: str | None = str(Path(scratch).resolve())

    def blob(self, digest: str, path: Path) -> Any:
        return str(path)

    def keep_only(self, digests: set[str]) -> None:
        pass

    def run(self, tasks: Sequence[DeviceTask]) -> Iterator[tuple[int, DeviceResult]]:
        for index, task in enumerate(tasks):
            yield index, run_device(task)

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name}

    def close(self) -> None:
        pass


@dataclass
class RayOptions:
    address: str | None = None  # None: start a local Ray here
    local_cpus: int | None = None  # the local Ray's CPUs (None: every core)
    num_cpus: float = 1.0  # each device task's request
    num_gpus: float = 0.0
    max_parallel: int | None = None  # at most this many devices training at once (None: as resources allow)


class RayExecutor:
    """Each device's round is a Ray task with the requested CPUs and GPUs; each artifact is put
    in Ray's object store once and read by the tasks that need it, on whatever node they run."""

    name = "ray"

    def __init__(self, options: RayOptions, scratch: Path | None) -> None:
        import ray

        self.options = options
        # A local Ray shares this machine's disk; a cluster's workers use their own temp folders.
        # (Absolute: a Ray worker's working folder need not be this process's.)
        self.scratch = str(Path(scratch).resolve()) if options.address is None and scratch is not None else None
        self._owns = not ray.is_initialized()
        if self._owns:
            env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
            if options.address is not None:
                ray.init(address=options.address, runtime_env=env, logging_level=logging.WARNING)
            else:
                ray.init(num_cpus=options.local_cpus, include_dashboard=False, runtime_env=env,
                         logging_level=logging.WARNING)
        # A failed device task fails the simulation, as a device that keeps failing would stall its round.
        self._remote = ray.remote(run_device).options(num_cpus=options.num_cpus, num_gpus=options.num_gpus,
                                                      max_retries=0)
        self._blobs: dict[str, Any] = {}

    def blob(self, digest: str, path: Path) -> Any:
        import ray

        if digest not in self._blobs:
            self._blobs[digest] = ray.put(path.read_bytes())
        return self._blobs[digest]

    def keep_only(self, digests: set[str]) -> None:
        self._blobs = {d: ref for d, ref in self._blobs.items() if d in digests}

    def run(self, tasks: Sequence[DeviceTask]) -> Iterator[tuple[int, DeviceResult]]:
        import ray

        limit = self.options.max_parallel or len(tasks)
        waiting = list(enumerate(tasks))
        running: dict[Any, int] = {}
        while waiting or running:
            while waiting and len(running) < limit:
                index, task = waiting.pop(0)
                running[self._remote.remote(task)] = index
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                yield running.pop(ref), ray.get(ref)

    def describe(self) -> dict[str, Any]:
        import ray

        resources = ray.cluster_resources()
        return {"executor": self.name, "address": self.options.address or "local", "ray": ray.__version__,
                "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
                "cluster_cpus": resources.get("CPU"), "cluster_gpus": resources.get("GPU", 0.0),
                "num_cpus": self.options.num_cpus, "num_gpus": self.options.num_gpus,
                "max_parallel": self.options.max_parallel}

    def close(self) -> None:
        import ray

        self._blobs.clear()
        if self._owns:
            ray.shutdown()
