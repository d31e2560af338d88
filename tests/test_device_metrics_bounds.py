"""Device metrics are bounded and typed (common/methods/reports.py): a device cannot grow the
database without bound, nest a report until a parser gives up, or put NaN, inf or a string where
the coordinator reads a number; honest reports, unknown keys included, still go through."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from cloud.store import BlobStore
from cloud.strategies import strategy_class
from common.methods import coplms, crosslm, fedavg
from common.methods.reports import (
    MAX_DEPTH,
    MAX_ITEMS,
    MAX_KEY,
    MAX_NODES,
    MAX_STRING,
    bounded_json,
    checked_metrics,
)
from common.protocol import META_METRICS, META_NUM_SAMPLES, DeviceProfile, RunSpec
from common.tensorfile import load_arrays, save_arrays
from tests.support import CoordinatorProcess, TinyWorld, run_spec

SCHEMA = fedavg.CONTRACT.device_metrics
PRIVACY = {"delta": 1e-5, "releases": 2, "clip_norm": 1.0, "noise_multiplier": 1.1}
TRAIN = {"steps": 4, "num_samples": 40, "seconds": 0.2, "loss_first": 5.0, "loss_last": 4.0, "loss_mean": 4.5}


def _nested(depth: int) -> dict:
    """`depth` objects, each inside the one before."""
    value: dict = {}
    for _ in range(depth - 1):  # built without recursion, however deep
        value = {"x": value}
    return value


HOSTILE = {
    "a long string": ({"note": "a" * (MAX_STRING + 1)}, "string longer than"),
    "a long key": ({"a" * (MAX_KEY + 1): 1}, "object key longer than"),
    "much text": ({f"k{i}": "b" * 1000 for i in range(40)}, "characters of text in all"),
    "a long list": ({"scores": list(range(MAX_ITEMS + 1))}, "more than 256 entries"),
    "many keys": ({f"k{i}": i for i in range(MAX_ITEMS + 1)}, "more than 256 entries"),
    "many values": ({f"k{i}": list(range(200)) for i in range(30)}, f"more than {MAX_NODES} values"),
    "deep nesting": (_nested(MAX_DEPTH + 1), f"nested more than {MAX_DEPTH} deep"),
    "very deep nesting": (_nested(100_000), f"nested more than {MAX_DEPTH} deep"),
    "a huge integer": ({"steps_total": 10**30}, "integer beyond"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_oversized_reports_are_refused_without_echoing_them(case: str) -> None:
    value, words = HOSTILE[case]
    with pytest.raises(ValidationError) as info:
        SCHEMA.model_validate(value)
    message = str(info.value.errors()[0]["msg"])
    assert words in message
    assert "aaaa" not in message and "bbbb" not in message


@pytest.mark.parametrize("epsilon", ["1.5", "x", True, -1.0, [1.0], {"v": 1}])
def test_an_epsilon_must_be_a_number_at_least_zero(epsilon) -> None:
    with pytest.raises(ValidationError):
        SCHEMA.model_validate({"privacy": {**PRIVACY, "epsilon": epsilon}})


@pytest.mark.parametrize("field, value", [("releases", "2"), ("releases", 2.0), ("clip_norm", 0.0),
                                          ("delta", 1.0), ("noise_multiplier", -0.1)])
def test_privacy_figures_are_typed(field: str, value) -> None:
    with pytest.raises(ValidationError):
        SCHEMA.model_validate({"privacy": {**PRIVACY, field: value}})


def test_non_finite_figures_are_stored_as_null() -> None:
    """The training code writes NaN for a loss it could not measure; what is stored has none."""
    sent = {"train": {**TRAIN, "loss_first": math.nan, "loss_mean": math.inf},
            "privacy": {**PRIVACY, "epsilon": math.inf}, "newer": {"figure": -math.inf, "kept": [1, "two", None]}}
    stored = checked_metrics(SCHEMA, sent)
    json.dumps(stored, allow_nan=False)  # raises on NaN or inf
    assert stored["train"]["loss_first"] is None and stored["train"]["loss_mean"] is None
    assert stored["train"]["loss_last"] == 4.0
    assert stored["privacy"]["epsilon"] is None  # inf: no finite guarantee, as the device itself says it
    assert stored["newer"] == {"figure": None, "kept": [1, "two", None]}
    # Only what the device sent: no defaults added.
    assert set(stored) == {"train", "privacy", "newer"} and "update_norm" not in stored["privacy"]


def test_a_required_figure_that_is_not_finite_is_refused() -> None:
    with pytest.raises(ValidationError):
        checked_metrics(SCHEMA, {"train": {**TRAIN, "seconds": math.nan}})
    with pytest.raises(ValidationError):
        checked_metrics(SCHEMA, {"local_eval_after": {"rougeL": math.nan, "em": 0.0, "n": 3}})


def test_what_honest_handlers_report_still_validates() -> None:
    per_domain = {f"lang{i}": {"rougeL": 0.5, "em": 0.0, "n": 3} for i in range(8)}
    evaluation = {"rougeL": 0.5, "em": 0.25, "n": 24, "per_domain": per_domain}
    checked_metrics(SCHEMA, {"local_eval_before": evaluation, "local_eval_after": evaluation, "train": TRAIN,
                             "privacy": {**PRIVACY, "epsilon": 3.2, "update_norm": 0.4, "clipped": True}})
    checked_metrics(coplms.CONTRACT.device_metrics, {
        "slm_arch": "gpt2", "dst_slm": TRAIN, "dst_proxy": TRAIN,
        "saml": {"steps": 4, "num_samples": 40, "seconds": 0.1, "aligned_vocab": [False, True],
                 "slm_loss_first": math.nan}})
    checked_metrics(crosslm.CONTRACT.device_metrics, {"slm_arch": "qwen2", "selected_used": 3, "synthetic": 9,
                                                      "train": TRAIN, "score_mean": None})
    assert bounded_json(_nested(MAX_DEPTH)) == _nested(MAX_DEPTH)


def test_round_figures_skip_stored_epsilons_that_are_not_numbers(tmp_path) -> None:
    """Rows stored before the schema was strict may hold "1.5" or NaN: max() over them raised
    TypeError and failed the run; now they are left out and the round goes on."""
    strategy = strategy_class("fedavg")(RunSpec(name="r", algorithm="fedavg", slm="/m"), BlobStore(tmp_path))
    stored = [{"privacy": {"epsilon": 1.0}}, {"privacy": {"epsilon": "1.5"}}, {"privacy": {"epsilon": math.nan}},
              {"privacy": {"epsilon": -2.0}}, {"privacy": {"epsilon": True}}, {"privacy": {"epsilon": 2.5}}, []]
    assert strategy.round_metrics(stored) == {"privacy_epsilon_max": 2.5}


# -- over HTTP ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    proc = CoordinatorProcess(tmp_path_factory.mktemp("coord")).start()
    yield proc
    proc.stop()


def test_hostile_metrics_in_an_upload_are_refused_and_change_nothing(coord, world: TinyWorld, tmp_path) -> None:
    from edge_sdk.client import CoordinatorClient

    spec = run_spec(world, name="metrics", algorithm="fedavg", rounds=1, min_clients=2, eval_data=None)
    assert httpx.post(f"{coord.url}/v1/runs", json=spec, headers=coord.admin, timeout=300).status_code == 201
    client = CoordinatorClient(coord.url)
    creds = client.register(spec["enroll_token"], "dev", DeviceProfile())
    info = client.current_round(creds.run_id)
    ref = next(r for r in info.artifacts if r.name == fedavg.SLM_ADAPTER)
    arrays = {k: np.asarray(v) + 0.01 for k, v in load_arrays(client.download(ref, tmp_path / "a")).items()}
    url = f"{coord.url}/v1/runs/{creds.run_id}/rounds/1/updates/{creds.client_id}"
    headers = {"Authorization": f"Bearer {client.token}"}

    def put(metrics: object) -> httpx.Response:
        body = save_arrays(arrays, {META_NUM_SAMPLES: "40", META_METRICS: json.dumps(metrics)})
        return httpx.put(url, content=body, headers=headers, timeout=60)

    hostile = {label: value for label, (value, _words) in HOSTILE.items() if label != "very deep nesting"}
    hostile["an epsilon that is a string"] = {"privacy": {**PRIVACY, "epsilon": "1.5"}}
    hostile["a count that is a float"] = {"train": {**TRAIN, "steps": 4.5}}
    for label, metrics in hostile.items():
        r = put(metrics)
        assert r.status_code == 422, f"{label}: {r.status_code} {r.text[:300]}"
        assert r.json()["detail"]["code"] == "bad_metadata", label
        assert len(r.content) < 2000 and "aaaa" not in r.text and "bbbb" not in r.text, label
        assert not client.current_round(creds.run_id).submitted, f"{label} was recorded"
    ok = put({"train": {**TRAIN, "loss_first": math.nan}, "newer_figure": [1, 2, 3]})
    assert ok.status_code == 201, ok.text
    client.close()
