"""The load benchmark (benchmarks/coordinator_load.py): what it measures and how it counts failures."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np

from benchmarks.coordinator_load import device, run_load_benchmark
from common.methods.fedavg import SLM_ADAPTER


def test_a_dropped_connection_is_a_failed_sample_and_the_device_retries() -> None:
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if request.method == "PUT" and calls.count("PUT") == 1:
            raise httpx.ReadError("connection reset", request=request)
        if request.url.path == "/v1/clients":
            return httpx.Response(201, json={"token": "t", "run_id": "r", "client_id": "c"})
        if request.url.path.endswith("/rounds/current"):
            return httpx.Response(200, json={"artifacts": [{"name": SLM_ADAPTER, "sha256": "ab"}]})
        return httpx.Response(200, content=b"x")

    async def go() -> list:
        samples: list = []
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            await device(0, "http://coordinator", "e", {"w": np.zeros(4, np.float32)}, asyncio.Semaphore(1),
                         client, samples)
        return samples

    samples = asyncio.run(go())
    uploads = [s for s in samples if s.op == "upload"]
    assert [(s.ok, s.transport_error) for s in uploads] == [(False, True), (True, False)]
    assert [s.op for s in samples if s.ok] == ["register", "poll", "download", "upload"]


def test_the_load_benchmark_reports_each_operation_against_a_real_coordinator(tmp_path) -> None:
    rows = run_load_benchmark([6], tmp_path, concurrency=3)
    (row,) = rows
    assert row["requests"] == 4 * 6 and row["errors"] == 0 and row["devices_failed"] == 0
    assert row["upload_p99_ms"] >= row["upload_p50_ms"] > 0 and row["close_s"] is not None
    on_disk = json.loads((tmp_path / "coordinator_load.json").read_text())
    assert on_disk["rows"] == rows and (tmp_path / "coordinator_load.png").stat().st_size > 0
