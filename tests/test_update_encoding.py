"""Update encodings: what a device sends under each, what the coordinator makes of it, and the
bytes saved, through the codec, a live coordinator, and real devices."""

from __future__ import annotations

import numpy as np
import pytest

from common.encoding import ENCODINGS, SCALE_SUFFIX, decode, encode, wire_schema
from common.methods.fedavg import SLM_ADAPTER
from common.protocol import META_NUM_SAMPLES, DeviceProfile
from common.tensorfile import load_arrays, read_header, save_arrays, schema_of
from edge_sdk.client import CoordinatorClient, CoordinatorError
from tests.secagg_support import final_adapter, weighted_mean
from tests.support import CoordinatorProcess, join_all, run_spec, wait_finished


def _pair(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    start = {"m.lora_A.weight": rng.normal(0, 0.3, (4, 16)).astype(np.float32),
             "m.lora_B.weight": np.zeros((16, 4), np.float32)}
    trained = {"m.lora_A.weight": start["m.lora_A.weight"] + rng.normal(0, 0.01, (4, 16)).astype(np.float32),
               "m.lora_B.weight": rng.normal(0, 0.02, (16, 4)).astype(np.float32)}
    return start, trained


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_codec_round_trip_within_its_bound(encoding: str) -> None:
    start, trained = _pair()
    schema = {k: (v.shape, "F32") for k, v in start.items()}
    wire = encode(trained, start, encoding)
    # What is sent is exactly what the coordinator expects to receive.
    assert schema_of(read_header(save_arrays(wire))) == {k: (tuple(s), d) for k, (s, d) in
                                                         wire_schema(schema, encoding).items()}
    back = decode(wire, start, encoding)
    for name, value in trained.items():
        change = value.astype(np.float64) - start[name]
        err = np.abs(back[name].astype(np.float64) - value)
        assert back[name].dtype == np.float32
        if encoding == "fp32":
            assert np.array_equal(back[name], value)
        elif encoding == "fp16":
            assert np.all(err <= np.abs(change) * 2.0**-11 + 1e-7)
        elif encoding == "int8-tensor":
            assert err.max() <= np.abs(change).max() / 254 + 1e-7
        else:  # one scale per rank component: rows of A (4, 16), columns of B (16, 4)
            axis = 1 if change.shape[0] > change.shape[1] else 0
            peak = np.abs(change).max(axis=1 - axis, keepdims=True)
            assert np.all(err <= peak / 254 + 1e-7)
            assert wire[name + SCALE_SUFFIX].shape == (4,)


def test_frozen_factors_travel_as_they_are() -> None:
    start, trained = _pair()
    trained["m.lora_A.weight"] = start["m.lora_A.weight"]

    def frozen(name: str) -> bool:
        return "lora_A" in name

    wire = encode(trained, start, "int8-row", frozen)
    assert wire["m.lora_A.weight"].dtype == np.float32 and "m.lora_A.weight" + SCALE_SUFFIX not in wire
    assert np.array_equal(decode(wire, start, "int8-row", frozen)["m.lora_A.weight"], start["m.lora_A.weight"])


def test_coordinator_decodes_before_it_checks_and_aggregates(world, tmp_path) -> None:
    spec = run_spec(world, name="int8", algorithm="fedavg", rounds=1, min_clients=3, update_encoding="int8-row")
    del spec["eval_data"], spec["aux_data"]
    coord = CoordinatorProcess(tmp_path / "coord", run=spec).start()
    try:
        clients = [CoordinatorClient(coord.url) for _ in range(3)]
        creds = [c.register(spec["enroll_token"], f"d{k}", DeviceProfile()) for k, c in enumerate(clients)]
        for c, cr in zip(clients, creds, strict=True):
            c.token = cr.token
        run_id = creds[0].run_id
        info = clients[0].current_round(run_id)
        assert (info.task.update_encoding, info.task.update_base) == ("int8-row", SLM_ADAPTER)
        ref = next(r for r in info.artifacts if r.name == SLM_ADAPTER)
        start = {k: np.array(v) for k, v in load_arrays(clients[0].download(ref, tmp_path / "start")).items()}
        rng = np.random.default_rng(1)
        trained = [{k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in start.items()}
                   for _ in range(3)]
        weights = [10, 20, 30]
        # A body in the wrong encoding, or whose scales are not finite, is refused and changes nothing.
        with pytest.raises(CoordinatorError) as plain:
            clients[0].upload_update(run_id, 1, creds[0].client_id,
                                     save_arrays(trained[0], {META_NUM_SAMPLES: "10"}))
        assert plain.value.status == 422 and plain.value.code == "wrong_tensors"
        bad = encode(trained[0], start, "int8-row")
        first = next(k for k in bad if k.endswith(SCALE_SUFFIX))
        bad[first] = np.full_like(bad[first], np.nan)
        with pytest.raises(CoordinatorError) as nan:
            clients[0].upload_update(run_id, 1, creds[0].client_id, save_arrays(bad, {META_NUM_SAMPLES: "10"}))
        assert nan.value.status == 422 and nan.value.code == "non_finite"
        sizes = []
        for c, cr, upd, w in zip(clients, creds, trained, weights, strict=True):
            body = save_arrays(encode(upd, start, "int8-row"), {META_NUM_SAMPLES: str(w)})
            sizes.append(len(body))
            c.upload_update(run_id, 1, cr.client_id, body)
        status = wait_finished(coord, run_id)
        assert status["state"] == "finished", status["error"]
        final = final_adapter(coord.url, coord.admin, run_id, tmp_path / "final")
        decoded = [decode(encode(u, start, "int8-row"), start, "int8-row") for u in trained]
        expected = weighted_mean(decoded, weights)
        for name, value in expected.items():
            assert np.max(np.abs(final[name] - value)) < 1e-6
        # The tensors' bytes: a quarter of fp32's, plus one float32 scale per rank component.
        encoded_bytes = sum(a.nbytes for a in encode(trained[0], start, "int8-row").values())
        assert encoded_bytes < sum(a.nbytes for a in trained[0].values()) * 0.3
        assert max(sizes) < len(save_arrays(trained[0], {META_NUM_SAMPLES: "10"}))
    finally:
        coord.stop()


def test_real_devices_upload_fp16(world, tmp_path) -> None:
    spec = run_spec(world, name="fp16", algorithm="fedavg", rounds=1, min_clients=2, update_encoding="fp16")
    del spec["aux_data"]
    coord = CoordinatorProcess(tmp_path / "coord", run=spec).start()
    try:
        status = join_all(coord, world, tmp_path, 2)
    finally:
        coord.stop()
    assert status["state"] == "finished", status.get("error")
    summary = [r for r in status["rounds"] if r["round"] == 1][0]
    adapter = next(a for a in summary["artifacts"] if a["name"] == SLM_ADAPTER)
    for figures in summary["metrics"]["clients"].values():
        assert figures["bytes_up"] < adapter["size"] * 0.6  # half of fp32, plus the header
