"""/metrics over real HTTP: a short FedAvg run on a live coordinator, scraped and parsed with
prometheus-client's own parser; the figures must follow what happened."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.methods.fedavg import SLM_ADAPTER
from common.protocol import META_METRICS, META_NUM_SAMPLES, DeviceProfile
from common.tensorfile import load_arrays, save_arrays
from edge_sdk.client import CoordinatorClient
from tests.support import CoordinatorProcess, run_spec

ROUNDS = 2
DEVICES = 2
UPDATE_ROUTE = "/v1/runs/{run_id}/rounds/{number}/updates/{client_id}"
PHASES = ("open", "collecting", "aggregating", "server_step", "publishing")


def _body(arrays: dict[str, np.ndarray], samples: int = 10) -> bytes:
    return save_arrays(arrays, {META_NUM_SAMPLES: str(samples), META_METRICS: json.dumps({"loss": 1.0})})


def _wait(what: str, check, timeout: float = 120.0) -> None:
    until = time.monotonic() + timeout
    while not check():
        if time.monotonic() > until:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _accepting(info, number: int) -> bool:
    return info.round == number and info.state.value in ("open", "collecting")


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def _value(samples, name: str, **labels: str) -> float:
    found = [v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items())]
    assert found, f"no sample {name} {labels}"
    return sum(found)


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A two-round FedAvg run with two devices that upload the adapter they were sent, one
    refused upload, a revoked third device, and a generate call past its rate; then scraped."""
    spec = run_spec(world, name="metrics-run", algorithm="fedavg", rounds=ROUNDS, min_clients=DEVICES)
    coord = CoordinatorProcess(tmp_path_factory.mktemp("coord"), run=spec,
                               extra={"generate_burst": 1, "generate_rate_per_minute": 0.5}).start()
    scratch = tmp_path_factory.mktemp("scratch")
    clients = []
    try:
        for k in range(DEVICES + 1):
            client = CoordinatorClient(coord.url)
            creds = client.register(spec["enroll_token"], f"dev{k}", DeviceProfile(cores=2))
            clients.append((client, creds))
        spare, spare_creds = clients.pop()
        assert httpx.delete(f"{coord.url}/v1/clients/{spare_creds.client_id}", headers=coord.admin,
                            timeout=10).status_code == 204
        run_id = clients[0][1].run_id
        sent = []
        for number in range(1, ROUNDS + 1):
            _wait(f"round {number}", lambda n=number: _accepting(clients[0][0].current_round(run_id), n))
            for i, (client, creds) in enumerate(clients):
                info = client.current_round(run_id)
                ref = next(r for r in info.artifacts if r.name == SLM_ADAPTER)
                adapter = {k: np.array(v) for k, v in load_arrays(client.download(ref, scratch / ref.sha256)).items()}
                url = f"{coord.url}/v1/runs/{run_id}/rounds/{number}/updates/{creds.client_id}"
                auth = {"Authorization": f"Bearer {client.token}"}
                if number == 1 and i == 0:  # refused: a NaN in the first tensor
                    poisoned = {k: v.copy() for k, v in adapter.items()}
                    next(iter(poisoned.values())).flat[0] = np.nan
                    body = _body(poisoned)
                    assert httpx.put(url, content=body, headers=auth, timeout=30).status_code == 422
                    sent.append(len(body))
                body = _body(adapter)
                assert httpx.put(url, content=body, headers=auth, timeout=30).status_code == 201
                sent.append(len(body))
        _wait("the run to finish", lambda: coord.status(run_id)["state"] == "finished")
        device = {"Authorization": f"Bearer {clients[0][0].token}"}
        generate = [httpx.post(f"{coord.url}/v1/generate", json={"prompt": "hi"}, headers=device, timeout=30)
                    for _ in range(2)]
        assert [r.status_code for r in generate] == [409, 429]  # FedAvg holds no LLM; then the rate
        assert httpx.get(f"{coord.url}/no/such/path/42", timeout=10).status_code == 404
        unauthorized = httpx.get(f"{coord.url}/metrics", timeout=10)
        scraped = httpx.get(f"{coord.url}/metrics", headers=coord.admin, timeout=10)
        yield {"unauthorized": unauthorized, "scraped": scraped, "sent": sent,
               "samples": _samples(scraped.text), "log": coord.state_dir / "coordinator.log"}
    finally:
        for client, _ in clients:
            client.close()
        coord.stop()


def test_metrics_need_the_admin_token(finished) -> None:
    assert finished["unauthorized"].status_code == 401
    assert finished["scraped"].status_code == 200
    assert finished["scraped"].headers["content-type"].startswith("text/plain; version=0.0.4")


def test_updates_are_counted_accepted_and_refused_by_reason(finished) -> None:
    s = finished["samples"]
    assert _value(s, "cotune_updates_accepted_total") == DEVICES * ROUNDS
    assert _value(s, "cotune_updates_refused_total", reason="non_finite") == 1
    assert _value(s, "cotune_updates_stored") == DEVICES * ROUNDS


def test_each_round_phase_is_timed(finished) -> None:
    s = finished["samples"]
    for phase in PHASES:
        assert _value(s, "cotune_round_phase_seconds_count", phase=phase) == ROUNDS, phase
    assert _value(s, "cotune_aggregation_seconds_count") == ROUNDS
    assert _value(s, "cotune_server_step_seconds_count") == ROUNDS
    assert _value(s, "cotune_server_step_seconds_sum") > 0


def test_devices_and_runs_by_state(finished) -> None:
    s = finished["samples"]
    assert _value(s, "cotune_devices", state="enrolled") == DEVICES
    assert _value(s, "cotune_devices", state="revoked") == 1
    assert _value(s, "cotune_runs", state="finished") == 1
    assert _value(s, "cotune_runs", state="running") == 0


def test_http_latency_and_bytes_by_route_template(finished) -> None:
    s = finished["samples"]
    uploads = DEVICES * ROUNDS
    assert _value(s, "cotune_http_request_duration_seconds_count", method="PUT", route=UPDATE_ROUTE,
                  status="201") == uploads
    assert _value(s, "cotune_http_request_duration_seconds_count", method="PUT", route=UPDATE_ROUTE,
                  status="422") == 1
    assert _value(s, "cotune_http_request_bytes_total", method="PUT", route=UPDATE_ROUTE) == sum(finished["sent"])
    assert _value(s, "cotune_http_response_bytes_total", method="GET", route="/v1/artifacts/{sha256}") > 0
    # A path no route matched is one label, never the path: labels stay bounded.
    assert _value(s, "cotune_http_request_duration_seconds_count", route="unmatched", status="404") == 1
    assert not any("/no/such" in lab.get("route", "") for _n, lab, _v in s)


def test_generate_latency_queue_and_refusals(finished) -> None:
    s = finished["samples"]
    assert _value(s, "cotune_generate_seconds_count") == 1
    assert _value(s, "cotune_generate_queue") == 0
    assert _value(s, "cotune_generate_refused_total", reason="rate_limited") == 1


def test_access_log_is_on_at_info(finished) -> None:
    log = Path(finished["log"]).read_text()
    assert '"GET /metrics HTTP/1.1" 200' in log


def test_apps_in_one_process_keep_separate_registries(tmp_path) -> None:
    from cloud.app import create_app
    from cloud.settings import CoordinatorSettings

    apps = [create_app(CoordinatorSettings(state_url=f"sqlite:///{tmp_path / f'{k}.db'}",
                                           artifact_dir=tmp_path / f"a{k}", work_dir=tmp_path / f"w{k}"),
                       start_driver=False) for k in range(2)]
    first, second = (app.state.telemetry for app in apps)
    assert first.registry is not second.registry
    first.updates_refused.labels("non_finite").inc()
    assert "non_finite" in first.render().decode()
    assert "non_finite" not in second.render().decode()


def test_the_example_grafana_dashboard_uses_only_served_metrics(finished) -> None:
    dashboard = json.loads((Path(__file__).parents[1] / "examples" / "grafana" / "cotune.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bcotune_[a-z_]+", expr)}
    served = {name for name, _labels, _value in finished["samples"]}
    assert used and used <= served, sorted(used - served)
