"""The simulation loop: the real coordinator in this process, the devices' work on an executor.

Per round (ARCHITECTURE.md, "Simulation"): the round driver ticks the round to `collecting`;
each device's RoundInfo comes from RunsService.current_round with the artifacts the
coordinator lets it read (ArtifactsService.for_client); its task runs on the executor; the
artifacts it fetched and had not held before are counted as its download; its update body is
accepted through UpdatesService once every device has finished, in device order (the
aggregate sums in upload order, so a fixed order gives the same bits whatever finished first);
the driver ticks the round through aggregation, the server step and publishing. Wall time,
bytes and the coordinator's round metrics are recorded per round.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.state.records import Direction
from common.protocol import RoundState, RunSpec
from common.records import TaskRecord
from cotune.simulation.coordinator import RoundMachine, enroll, in_memory_coordinator, transfer_bytes, upload
from cotune.simulation.device import DeviceTask
from cotune.simulation.executors import Executor


@dataclass
class DeviceData:
    name: str
    records: list[TaskRecord]
    eval_records: list[TaskRecord] = field(default_factory=list)


@dataclass
class SimulationJob:
    spec: RunSpec  # rounds, method, models, training; min_clients and max_devices are set from the devices
    devices: list[DeviceData]
    threads: int = 1  # torch threads per device task
    info: dict[str, Any] = field(default_factory=dict)  # how the job was made (data, partition), for the report


def simulate(job: SimulationJob, executor: Executor, work_dir: Path, final_dir: Path,
             progress: bool = True, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the job; return its figures (JSON-able) and write its final adapters under `final_dir`."""
    if job.spec.secure_aggregation is not None:
        raise ValueError("cotune simulate does not run secure aggregation's key and share phases; drop "
                         "secure_aggregation from the run config (cotune bench load --secure-aggregation measures it)")
    if not job.devices:
        raise ValueError("no devices to simulate")
    started = time.perf_counter()
    work_dir = Path(work_dir)
    n = len(job.devices)
    spec = job.spec.model_copy(update={"min_clients": n, "max_devices": max(n, job.spec.max_devices),
                                       "builds": [], "enroll_token": None})
    coordinator = in_memory_coordinator(work_dir, work_dir / "store")
    sim_id = uuid.uuid4().hex[:12]
    try:
        created = coordinator.runs.create(spec)
        run_id = created.run_id
        clients = [enroll(coordinator, created.enroll_token, dev.name) for dev in job.devices]
        machine = RoundMachine(coordinator, run_id)
        held: list[set[str]] = [set() for _ in job.devices]  # what each device's cache would hold
        states: list[dict[str, bytes]] = [{} for _ in job.devices]
        pending = work_dir / "pending"
        pending.mkdir(parents=True, exist_ok=True)
        setup_s = time.perf_counter() - started
        rounds: list[dict[str, Any]] = []
        with _progress(progress, spec.rounds * n) as bar:
            for number in range(1, spec.rounds + 1):
                round_started = time.perf_counter()
                machine.tick_until(lambda rnd, k=number: rnd.number == k and rnd.state is RoundState.collecting)
                open_s = time.perf_counter() - round_started  # round 1's includes the starting inputs and scores
                tasks, sizes = [], {}
                for k, (dev, client) in enumerate(zip(job.devices, clients, strict=True)):
                    info = coordinator.runs.current_round(client, run_id)
                    blobs = {}
                    for ref in info.artifacts:
                        blobs[ref.sha256] = executor.blob(ref.sha256,
                                                          coordinator.artifacts.for_client(client, ref.sha256))
                        sizes[ref.sha256] = ref.size
                    tasks.append(DeviceTask(name=dev.name, round_info=info.model_dump_json(), records=dev.records,
                                            blobs=blobs, state=states[k], eval_records=dev.eval_records,
                                            scratch=executor.scratch, simulation_id=sim_id, threads=job.threads))
                executor.keep_only(set(sizes))
                device_s = [0.0] * n
                train_started = time.perf_counter()
                for k, result in executor.run(tasks):
                    for digest in result.fetched:
                        if digest not in held[k]:  # a download, as the artifact route would count it
                            coordinator.updates.record_transfer(clients[k], Direction.down, sizes[digest])
                            held[k].add(digest)
                    states[k] = result.state
                    device_s[k] = result.seconds
                    (pending / f"{k}.safetensors").write_bytes(result.body)
                    if bar is not None:
                        bar.advance(0)
                train_s = time.perf_counter() - train_started
                server_started = time.perf_counter()
                for k, client in enumerate(clients):
                    upload(coordinator, client, run_id, number, (pending / f"{k}.safetensors").read_bytes())
                machine.tick_until(lambda rnd, k=number: rnd.number > k or rnd.state is RoundState.closed)
                server_s = time.perf_counter() - server_started
                figures = _round_figures(coordinator, run_id, number, clients, job, device_s)
                figures.update(wall_s=time.perf_counter() - round_started, open_s=open_s, devices_s=train_s,
                               server_s=server_s)
                rounds.append(figures)
                say(_round_line(figures, spec.rounds))
        run = coordinator.runs.get(run_id)
        status = coordinator.runs.status(run_id)
        named = coordinator.runs.holdings(run).named
        finals = _keep_final(coordinator, run, named, final_dir)
        initial = status.rounds[0].metrics if status.rounds and status.rounds[0].round == 0 else {}
        return {"run": {"state": run.state.value, "algorithm": spec.algorithm, "rounds": spec.rounds,
                        "initial_metrics": _jsonable(initial)},
                "spec": spec.model_dump(mode="json", exclude={"enroll_token"}),
                "executor": executor.describe(), "job": job.info, "rounds": rounds,
                "final": {"artifacts": named, **finals},
                "totals": {"wall_s": time.perf_counter() - started, "setup_s": setup_s,
                           "rounds_s": sum(r["wall_s"] for r in rounds),
                           "bytes_up": sum(r["bytes_up"] for r in rounds),
                           "bytes_down": sum(r["bytes_down"] for r in rounds)}}
    finally:
        coordinator.close()
        shutil.rmtree(work_dir / "pending", ignore_errors=True)


def _round_figures(coordinator: Any, run_id: str, number: int, clients: list[Any], job: SimulationJob,
                   device_s: list[float]) -> dict[str, Any]:
    summary = coordinator.runs.round_summary(run_id, number)
    per_client = summary.metrics.get("clients", {})
    ups = transfer_bytes(coordinator, run_id, number, clients, Direction.up)
    downs = transfer_bytes(coordinator, run_id, number, clients, Direction.down)
    devices = []
    for dev, client, up, down, seconds in zip(job.devices, clients, ups, downs, device_s, strict=True):
        metrics = per_client.get(client.id, {}).get("client_metrics") or {}
        train = metrics.get("train") if isinstance(metrics.get("train"), dict) else {}
        devices.append({"name": dev.name, "samples": per_client.get(client.id, {}).get("num_samples"),
                        "seconds": round(seconds, 4), "bytes_up": up, "bytes_down": down,
                        "loss_mean": train.get("loss_mean"), "loss_last": train.get("loss_last")})
    losses = [d["loss_mean"] for d in devices if isinstance(d["loss_mean"], (int, float))]
    return {"round": number, "state": summary.state.value, "updates": summary.num_updates,
            "samples": summary.num_samples, "bytes_up": sum(ups), "bytes_down": sum(downs),
            "device_s_mean": sum(device_s) / len(device_s), "device_s_max": max(device_s),
            "train_loss_mean": sum(losses) / len(losses) if losses else None,
            "metrics": _jsonable({k: v for k, v in summary.metrics.items() if k != "clients"}),
            "devices": devices}


def _keep_final(coordinator: Any, run: Any, named: dict[str, str], final_dir: Path) -> dict[str, Any]:
    """Copy the run's final adapters (the shared SLM's, the LLM's) out of the store."""
    strategy = coordinator.runs.strategy(run)
    out: dict[str, Any] = {}
    chosen = (("slm_adapter", strategy.exportable_model(named)), ("llm_adapter", strategy.llm_adapter(named)))
    for key, served in chosen:
        if served is None:
            continue
        final_dir.mkdir(parents=True, exist_ok=True)
        dest = final_dir / f"{key.replace('_', '-')}.safetensors"
        shutil.copyfile(coordinator.store.path(served.adapter_digest), dest)
        out[key] = {"sha256": served.adapter_digest, "path": str(dest), "base": served.checkpoint}
    return out


def _round_line(figures: dict[str, Any], total: int) -> str:
    loss = figures["train_loss_mean"]
    scores = figures["metrics"].get("slm") or {}
    extra = f", SLM Rouge-L {100 * scores['rougeL']:.1f}" if "rougeL" in scores else ""
    return (f"round {figures['round']}/{total}: {figures['updates']} updates in {figures['wall_s']:.1f} s "
            f"(devices {figures['devices_s']:.1f} s, server {figures['server_s']:.1f} s)"
            + (f", train loss {loss:.3f}" if loss is not None else "") + extra)


class _Bar:
    def __init__(self, progress: Any, task: Any) -> None:
        self.progress, self.task = progress, task

    def advance(self, _index: int) -> None:
        self.progress.advance(self.task)


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return nullcontext(None)
    from contextlib import contextmanager

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    @contextmanager
    def bar() -> Any:
        with Progress(TextColumn("device rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as prog:
            yield _Bar(prog, prog.add_task("devices", total=total))

    return bar()


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))
