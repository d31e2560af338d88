"""Shared state: the same run on SQLite and on PostgreSQL, and two coordinator replicas on
one database and one artifact store (a shared directory, or an S3 bucket as replicas on
several machines use) never doing a round's slow step twice."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from common.methods.fedavg import SLM_ADAPTER
from common.protocol import ArtifactRef
from edge_sdk.client import CoordinatorClient
from tests.s3_support import s3_server
from tests.support import CoordinatorProcess, run_spec
from tests.test_faults import _updates


@pytest.fixture(params=["local", "s3"])
def artifact_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The replicas' shared artifact store settings: one directory, or one bucket on a local S3 server."""
    if request.param == "local":
        yield {"artifact_dir": str(tmp_path / "blobs")}
        return
    with s3_server() as s3:
        yield s3.settings(s3.new_bucket())


def test_two_replicas_share_one_database(world, tmp_path: Path, state_url: str,
                                         artifact_store: dict[str, Any]) -> None:
    spec = run_spec(world, name="replicated", rounds=2, min_clients=2)
    shared = {"state_url": state_url, **artifact_store}
    first = CoordinatorProcess(tmp_path / "r1", run=spec, extra=shared).start()
    second = CoordinatorProcess(tmp_path / "r2", run=spec, extra=shared, admin_token=first.admin_token).start()
    try:
        a, b = CoordinatorClient(first.url), CoordinatorClient(second.url)
        ca, cb = a.register(spec["enroll_token"], "a"), b.register(spec["enroll_token"], "b")
        assert ca.run_id == cb.run_id, "both replicas must serve the one run"
        run_id = ca.run_id
        for number in (1, 2):
            deadline = time.monotonic() + 120
            while a.current_round(run_id).round != number and time.monotonic() < deadline:
                time.sleep(0.2)
            body_a, body_b = _updates(a, run_id, tmp_path, [number * 10, number * 10 + 1])
            a.upload_update(run_id, number, ca.client_id, body_a)
            b.upload_update(run_id, number, cb.client_id, body_b)
        deadline = time.monotonic() + 180
        while first.status(run_id)["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.3)
        status_1, status_2 = first.status(run_id), second.status(run_id)
        assert status_1["state"] == "finished", status_1["error"] or first.log_tail()
        assert status_1 == status_2
        # A device fetches the published adapter from the replica that did not necessarily make
        # it, resuming a partial file (a Range request), and checks its digest.
        final = ArtifactRef.model_validate(
            next(r for r in status_2["rounds"][-1]["artifacts"] if r["name"] == SLM_ADAPTER))
        whole = b.download(final, tmp_path / "final-whole").read_bytes()
        assert hashlib.sha256(whole).hexdigest() == final.sha256
        dest = tmp_path / "final.safetensors"
        dest.with_name(dest.name + ".part").write_bytes(whole[: len(whole) // 2])
        assert b.download(final, dest).read_bytes() == whole
        a.close()
        b.close()
    finally:
        first.stop()
        second.stop()

    engine = create_engine(state_url)
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT r.number, e.step, COUNT(*), COUNT(DISTINCT e.instance) FROM round_events e "
            "JOIN rounds r ON r.id = e.round_id GROUP BY r.number, e.step ORDER BY r.number, e.step"
        )).all()
    engine.dispose()
    assert [(n, step) for n, step, _, _ in rows] == [
        (1, "aggregating"), (1, "server_step"), (2, "aggregating"), (2, "server_step")]
    for number, step, count, instances in rows:
        assert count == 1 and instances == 1, f"round {number} {step} ran {count} times"
