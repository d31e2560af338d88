"""Edge builds (GGUF / ONNX): the coordinator's, exported with `export/` from the model the
strategy names and stored content-addressed; and the ones devices make of SLMs that never
leave them, of which only the manifest is reported. Each device is offered the build that
best fits its profile, among the ones it may see."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from cloud.errors import ApiError
from cloud.services.auth import check_member
from cloud.state import CoordinatorState
from cloud.state.records import ArtifactRecord, BuildRecord, ClientRecord, RunRecord
from cloud.store import BlobStore
from cloud.strategies.base import ServedModel
from common.manifest import BuildManifest
from common.protocol import ArtifactRef, BuildInfo, BuildList, DeviceBuildReport, DeviceProfile, RunState

if TYPE_CHECKING:
    from cloud.services.runs import Holdings, RunsService

log = logging.getLogger("cotune.builds")


def builds_state(run: RunRecord) -> str:
    """none (no builds asked for, or the devices make them), pending, ready or failed."""
    if not run.spec.get("builds"):
        return "none"
    record = run.metrics.get("builds")
    if record is None:
        return "failed" if run.state == RunState.failed else "pending"
    if "error" in record:
        return "failed"
    return "none" if record.get("on_devices") else "ready"


class BuildsService:
    def __init__(self, state: CoordinatorState, store: BlobStore, runs: RunsService, work_dir: Path) -> None:
        self.state = state
        self.store = store
        self.runs = runs
        self.work_dir = Path(work_dir)
        # One export at a time in this process (the admin's and the round driver's): two would
        # race to record the same builds. Replicas take the build lease (cloud/rounds.py).
        self._exporting = threading.Lock()

    def _exportable(self, run: RunRecord) -> tuple[ServedModel | None, Holdings]:
        held = self.runs.holdings(run)
        return self.runs.strategy(run).exportable_model(held.named), held

    def publish(self, run_id: str, targets: list[str]) -> list[BuildInfo]:
        """Export the model the run's strategy names (as of its last closed round) to `targets`."""
        run = self.runs.get(run_id)
        served, held = self._exportable(run)
        if served is None:
            raise ApiError(409, "builds_on_devices",
                           f"run {run.name!r} ({run.algorithm}) keeps each device's SLM on the device, so the "
                           "coordinator has no model to build; each device builds its own and reports it",
                           f"list the run's builds with GET /v1/runs/{run_id}/builds")
        with self._exporting:
            infos = self._export(run_id, served, held, targets)
        log.info("run %s: published builds %s of round %d", run_id, [i.name for i in infos], held.round)
        return infos

    def _export(self, run_id: str, served: ServedModel, held: Holdings, targets: list[str]) -> list[BuildInfo]:
        from export.errors import ExportError
        from export.isolated import export_builds_isolated

        work = Path(tempfile.mkdtemp(prefix="builds-", dir=self.work_dir))
        try:
            try:
                # in a child process: a native crash in an exporter must not end the coordinator
                adapter = (self.store.read_bytes(served.adapter_digest), served.lora)
                results = export_builds_isolated(served.checkpoint, adapter, targets, work / "out", run_id=run_id,
                                                 round=held.round, progress=False)
            except (ExportError, ValueError) as exc:
                raise ApiError(422, "export_failed", str(exc), "check the targets and the parity bounds") from None
            infos, builds, files = [], [], []
            for result in results:
                data = result.manifest.model_dump(mode="json")
                for f in result.manifest.files:
                    self.store.put_file(result.path / f.name, f.sha256)
                    files.append(ArtifactRecord(f.sha256, f.size, client_visible=True))
                builds.append(BuildRecord(run_id=run_id, round=held.round, name=result.path.name, manifest=data))
                infos.append(build_info(builds[-1]))
            self.state.upsert_builds(builds, files)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return infos

    def pending_runs(self) -> list[RunRecord]:
        """Finished runs whose spec asks for builds that have not been published (nor failed)."""
        return [r for r in self.state.list_runs(RunState.finished)
                if r.spec.get("builds") and "builds" not in r.metrics]

    def publish_run(self, run: RunRecord) -> None:
        """Publish the builds a finished run's spec asks for and record how it went. The round
        driver calls this under the run's build lease, so one replica does it, once."""
        record: dict[str, Any]
        if self._exportable(run)[0] is None:
            record = {"names": [], "on_devices": True}  # nothing to do here: the devices build
        else:
            try:
                record = {"names": [b.name for b in self.publish(run.id, run.spec["builds"])]}
            except Exception as exc:  # the run itself succeeded; only its builds failed
                log.exception("run %s: publishing builds failed", run.id)
                message = exc.detail.message if isinstance(exc, ApiError) else f"{type(exc).__name__}: {exc}"
                record = {"error": message}
        self.state.set_run_metrics(run.id, {"builds": record})

    def report_device_build(self, client: ClientRecord, run_id: str, report: DeviceBuildReport) -> BuildInfo:
        """Record a build a device made of its own SLM; only it and the admin will see it."""
        check_member(client, run_id, "a client may only report builds into the run it belongs to")
        run = self.runs.get(run_id)
        try:
            manifest = BuildManifest.model_validate(report.manifest)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
            raise ApiError(422, "bad_manifest", f"the build manifest is not valid: {problems}",
                           "send the manifest.json the exporter wrote beside the build") from None
        if manifest.run_id is not None and manifest.run_id != run_id:
            raise ApiError(422, "bad_manifest", f"the build was made for run {manifest.run_id!r}, not this one")
        number = self.runs.holdings(run).round if manifest.round is None else manifest.round
        if not 0 <= number <= run.current_round:
            raise ApiError(422, "bad_manifest", f"the build is of round {number}, which this run has not reached",
                           f"the run is at round {run.current_round}")
        build = BuildRecord(run_id=run_id, round=number, name=report.name,
                            manifest=manifest.model_dump(mode="json"), client_id=client.id)
        self.state.upsert_builds([build])
        log.info("run %s: device %s reported build %s of round %d", run_id, client.id, report.name, number)
        return build_info(build)

    def list_builds(self, run_id: str, viewer: ClientRecord | None, profile: DeviceProfile | None) -> BuildList:
        """The builds `viewer` may see (all for the admin); with a profile, also the best fit."""
        check_member(viewer, run_id, "a client may only read the builds of its own run")
        self.runs.get(run_id)
        builds = [build_info(b) for b in self.state.list_builds(run_id, viewer.id if viewer else None)]
        if profile is None or not builds:
            return BuildList(builds=builds, reason=None if builds else "the run has published no builds yet")
        from common.selection import NoSuitableBuildError, choose_build

        manifests = [BuildManifest.model_validate(b.manifest) for b in builds]
        try:
            best = choose_build(manifests, profile)
        except NoSuitableBuildError as exc:
            return BuildList(builds=builds, reason=str(exc))
        return BuildList(builds=builds, best=builds[manifests.index(best)])


def build_info(build: BuildRecord) -> BuildInfo:
    files = [ArtifactRef(name=f["name"], sha256=f["sha256"], size=f["size"]) for f in build.manifest.get("files", [])]
    return BuildInfo(name=build.name, round=build.round, manifest=build.manifest, files=files)
