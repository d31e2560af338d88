"""Edge builds of a run's co-tuned SLM: exported with `export/`, stored content-addressed,
and offered to each device as the build that best fits its profile."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import select

from cloud.db import Artifact, Build, Round, Run
from cloud.errors import ApiError, forbidden
from common.manifest import BuildManifest
from common.protocol import ArtifactRef, BuildInfo, BuildList, DeviceProfile, RunSpec, RunState

log = logging.getLogger("cotune.builds")

SLM_ADAPTER = "slm/adapter.safetensors"


def publish_builds(coord: Any, run_id: str, targets: list[str]) -> list[BuildInfo]:
    """Export the run's current SLM (base + latest adapter) to `targets` and record the builds."""
    from export.errors import ExportError
    from export.pipeline import export_builds

    with coord.Session() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise ApiError(404, "not_found", f"run {run_id!r} does not exist")
        finished = run.state == RunState.finished.value
        rnd = s.scalar(select(Round).where(Round.run_id == run_id, Round.number == run.current_round))
        named = run.artifacts if finished else rnd.inputs
        round_of = run.current_round if finished else run.current_round - 1
    spec = RunSpec.model_validate(run.spec)
    adapter = named.get(SLM_ADAPTER)
    if adapter is None:
        raise ApiError(409, "no_slm_adapter", f"run {run.name!r} has no SLM adapter to export")
    work = Path(tempfile.mkdtemp(prefix="builds-", dir=coord.spool_dir))
    try:
        try:
            results = export_builds(spec.slm, (coord.store.read_bytes(adapter), spec.lora), targets, work / "out",
                                    run_id=run_id, round=round_of, progress=False)
        except (ExportError, ValueError) as exc:
            raise ApiError(422, "export_failed", str(exc), "check the targets and the parity bounds") from None
        infos = []
        with coord.Session.begin() as s:
            for result in results:
                manifest = result.manifest
                refs = []
                for f in manifest.files:
                    digest = coord.store.put_file(result.path / f.name, f.sha256)
                    refs.append(ArtifactRef(name=f.name, sha256=digest, size=f.size))
                    if s.scalar(select(Artifact).where(Artifact.run_id == run_id, Artifact.sha256 == digest)) is None:
                        s.add(Artifact(run_id=run_id, sha256=digest, size=f.size, client_visible=True))
                name = result.path.name
                data = manifest.model_dump(mode="json")
                row = s.scalar(select(Build).where(Build.run_id == run_id, Build.round == round_of, Build.name == name))
                if row is None:
                    s.add(Build(run_id=run_id, round=round_of, name=name, manifest=data))
                else:
                    row.manifest = data
                infos.append(BuildInfo(name=name, round=round_of, manifest=data, files=refs))
        log.info("run %s: published builds %s of round %d", run_id, [i.name for i in infos], round_of)
        return infos
    finally:
        shutil.rmtree(work, ignore_errors=True)


def list_builds(coord: Any, run_id: str, viewer: Any, profile: DeviceProfile | None) -> BuildList:
    if viewer is not None and viewer.run_id != run_id:
        raise forbidden("a client may only read the builds of its own run")
    with coord.Session() as s:
        if s.get(Run, run_id) is None:
            raise ApiError(404, "not_found", f"run {run_id!r} does not exist")
        rows = list(s.scalars(select(Build).where(Build.run_id == run_id).order_by(Build.round, Build.name)))
    builds = [BuildInfo(name=r.name, round=r.round, manifest=r.manifest,
                        files=[ArtifactRef(name=f["name"], sha256=f["sha256"], size=f["size"])
                               for f in r.manifest.get("files", [])]) for r in rows]
    if profile is None or not builds:
        return BuildList(builds=builds, reason=None if builds else "the run has published no builds yet")
    from common.selection import NoSuitableBuildError, choose_build

    manifests = [BuildManifest.model_validate(b.manifest) for b in builds]
    try:
        best = choose_build(manifests, profile)
    except NoSuitableBuildError as exc:
        return BuildList(builds=builds, reason=str(exc))
    return BuildList(builds=builds, best=builds[manifests.index(best)])
