"""Secure aggregation end to end against a real coordinator process: the coordinator unmasks the
weighted sum and nothing else, survives dropouts at every phase and crashes at every phase
boundary, and refuses wrong or replayed messages."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

from cloud.secure.spec import secure_aggregation_problem
from common.protocol import RunSpec
from common.secagg import crypto, shamir
from common.secagg.ring import error_bound, fraction_bits, layout_of, quantize, unflatten
from common.tensorfile import load_arrays
from edge_sdk.client import CoordinatorError
from edge_sdk.secagg import SecureAggregationRefused
from tests.secagg_support import SimDevice, final_adapter, wait_state, weighted_mean
from tests.support import CoordinatorProcess, join_all, run_spec, wait_finished

SECURE = {"phase_deadline_s": 4.0, "clip": 4.0}


def _spec(world, name: str, **overrides) -> dict:
    settings = {"algorithm": "fedavg", "rounds": 1, "min_clients": 3, "eval_data": None, "aux_data": None,
                "round_deadline_s": 4.0, "secure_aggregation": SECURE, **overrides}
    spec = run_spec(world, name=name, **settings)
    return {k: v for k, v in spec.items() if v is not None}  # TOML has no null: unset is None


def _updates(start: dict[str, np.ndarray], n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: (v + rng.normal(0, 0.5, v.shape)).astype(np.float32) for k, v in start.items()} for _ in range(n)]


def _close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], bound: float) -> float:
    worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in b)
    assert worst <= bound, f"off by {worst} > {bound}"
    return worst


# -- the pieces, without a coordinator --------------------------------------------------------

def test_quantised_sums_are_exact_within_the_bound() -> None:
    rng = np.random.default_rng(0)
    layout = [("a", (3, 5)), ("b", (7,))]
    updates = [{"a": rng.normal(size=(3, 5)), "b": rng.normal(size=7)} for _ in range(5)]
    weights = [3, 1, 40, 7, 1]
    bits = fraction_bits(1000 * 1_000_000, 4.0)
    total = np.zeros(22, dtype=np.uint64)
    for u, w in zip(updates, weights, strict=True):
        total += quantize(u, layout, w, 4.0, bits)[0]
    mean = unflatten(total.view(np.int64).astype(np.float64) / (2.0 ** bits * sum(weights)), layout, np.float64)
    _close(mean, weighted_mean(updates, weights), error_bound(bits))


def test_shamir_needs_the_threshold() -> None:
    secret = crypto.new_private_key()
    shares = shamir.split(secret, 3, 5)
    assert shamir.combine([(2, shares[1]), (4, shares[3]), (5, shares[4])], 3) == secret
    assert shamir.combine([(1, shares[0]), (2, shares[1]), (4, shares[2])], 3) != secret  # a wrong index
    with pytest.raises(ValueError, match="cannot rebuild"):
        shamir.combine([(1, shares[0]), (2, shares[1])], 3)


def test_spec_refuses_what_needs_individual_updates(world) -> None:
    base = _spec(world, "spec")
    assert secure_aggregation_problem(RunSpec.model_validate(base)) is None
    for change, words in [({"aggregation": {"rule": "median"}}, "median"),
                          ({"aggregation": {"norm_bound": 1.0}}, "norm_bound"),
                          ({"lora": {"aggregation": "svd"}}, "svd"),
                          ({"min_clients": 2}, "min_clients")]:
        problem = secure_aggregation_problem(RunSpec.model_validate({**base, **change}))
        assert problem is not None and words in problem, (change, problem)
    assert RunSpec.model_validate({**base, "secure_aggregation": True}).secure_aggregation is not None
    assert RunSpec.model_validate({**base, "secure_aggregation": False}).secure_aggregation is None


# -- over HTTP -------------------------------------------------------------------------------

def test_secure_round_unmasks_the_weighted_mean_and_refuses_bad_messages(world, tmp_path) -> None:
    spec = _spec(world, "secure", rounds=2)
    coord = CoordinatorProcess(tmp_path / "coord", run=spec).start()
    try:
        devices = [SimDevice(coord.url, spec["enroll_token"], f"d{k}", tmp_path) for k in range(4)]
        info = wait_state(devices[0], "keys")
        # A plain upload into a secure run is refused before its body is read.
        with pytest.raises(CoordinatorError) as refused:
            devices[0].client.upload_update(devices[0].run_id, 1, devices[0].id, b"x" * 64)
        assert refused.value.status == 409 and refused.value.code == "secagg_wrong_phase"
        for d in devices:
            d.keys(info)
        devices[0].keys(info)  # resent: the same keys are a duplicate, not an error
        # Another client's keys, or a second pair from the same client, are refused.
        with pytest.raises(CoordinatorError) as other:
            devices[1].client.advertise_keys(devices[1].run_id, 1, devices[0].id, devices[1].session(info).advert())
        assert other.value.status == 403
        info = wait_state(devices[0], "shares")
        for d in devices:
            d.shares(info)
        info = wait_state(devices[0], "collecting")
        start = devices[0].start_adapter(info)
        updates, weights = _updates(start, 4), [30, 10, 5, 55]
        for d, upd, w in zip(devices, updates, weights, strict=True):
            d.upload(info, upd, w)
        info = wait_state(devices[0], "unmasking")
        # A share that is not the one dealt is refused, and changes nothing.
        request = devices[0].client.unmask_request(devices[0].run_id, 1)
        honest = devices[0].session(info).reveal(request)
        forged = honest.model_copy(update={"seed_shares": {k: bytes(len(v)) for k, v in honest.seed_shares.items()}})
        with pytest.raises(CoordinatorError) as bad:
            devices[0].client.reveal(devices[0].run_id, 1, devices[0].id, forged)
        assert bad.value.status == 422 and bad.value.code == "secagg_bad_share"
        # An honest device never reveals both secrets of one neighbour, whatever it is asked.
        both = request.model_copy(update={"dropped": request.uploaded[:1]})
        with pytest.raises(SecureAggregationRefused, match="both secrets"):
            devices[0].session(info).reveal(both)
        for d in devices:
            d.reveal(info)

        round2 = wait_state(devices[0], "keys", round_number=2)
        # Round 1's keys replayed into round 2 are refused.
        stale = devices[1].session(info).advert()
        with pytest.raises(CoordinatorError) as replay:
            devices[1].client.advertise_keys(devices[1].run_id, 2, devices[1].id, stale)
        assert replay.value.status == 409 and replay.value.code == "secagg_key_reused"
        summary = coord.status(devices[0].run_id)["rounds"][-2]
        secure = summary["metrics"]["aggregation"]["secure_aggregation"]
        assert secure["uploaders"] == 4 and secure["rebuilt_seeds"] == 4 and secure["rebuilt_keys"] == 0
        assert "lora_factor_gap" not in summary["metrics"]["aggregation"]
        expected = weighted_mean(updates, weights)
        got = {k: np.array(v) for k, v in load_arrays(devices[0].client.download(
            next(r for r in round2.artifacts if r.name.endswith("adapter.safetensors")),
            tmp_path / "round2-start.safetensors")).items()}
        _close(got, expected, error_bound(secure["fraction_bits"]) + 1e-6)  # + float32 rounding
    finally:
        coord.stop()


def test_dropouts_at_every_phase_and_a_late_device(world, tmp_path) -> None:
    spec = _spec(world, "dropouts", min_clients=3)
    coord = CoordinatorProcess(tmp_path / "coord", run=spec).start()
    try:
        devices = [SimDevice(coord.url, spec["enroll_token"], f"d{k}", tmp_path) for k in range(7)]
        never_keys, after_shares = devices[6], devices[5]  # devices[4] uploads, then leaves
        info = wait_state(devices[0], "keys")
        for d in devices[:6]:
            d.keys(info)
        info = wait_state(devices[0], "shares", timeout=30)  # after the key phase's deadline
        with pytest.raises(CoordinatorError) as late_keys:
            never_keys.keys(info)
        assert late_keys.value.code == "secagg_wrong_phase"
        for d in devices[:6]:
            d.shares(info)
        info = wait_state(devices[0], "collecting")
        start = devices[0].start_adapter(info)
        updates, weights = _updates(start, 5, seed=3), [11, 22, 33, 44, 55]
        late_body = after_shares.masked_body(info, _updates(start, 1, seed=9)[0], 77)
        for d, upd, w in zip(devices[:5], updates, weights, strict=True):
            d.upload(info, upd, w)
        info = wait_state(devices[0], "unmasking", timeout=30)  # after the round's deadline
        # The device that dealt shares but never uploaded comes back late: refused, not counted.
        with pytest.raises(CoordinatorError) as late:
            after_shares.client.upload_update(after_shares.run_id, 1, after_shares.id, late_body)
        assert late.value.status == 409
        for d in devices[:4]:  # after_upload uploaded a masked update and then left
            request = d.client.unmask_request(d.run_id, 1)
            assert after_shares.id in request.dropped or after_shares.id not in request.uploaded
            assert after_shares.id not in request.uploaded  # its seed is never asked for
            d.reveal(info)
        status = wait_finished(coord, devices[0].run_id)
        assert status["state"] == "finished", status["error"]
        secure = status["rounds"][-1]["metrics"]["aggregation"]["secure_aggregation"]
        assert (secure["members"], secure["dealers"], secure["uploaders"]) == (6, 6, 5)
        # Six members, each with five neighbours: a secret has six holders and needs four shares,
        # and exactly four devices answered the unmask phase: the fewest the round can end with.
        assert (secure["neighbours"], secure["threshold"]) == (5, 4)
        assert secure["rebuilt_keys"] == 1  # after_shares' masking key, to take its pairwise masks out
        final = final_adapter(coord.url, coord.admin, devices[0].run_id, tmp_path / "final.safetensors")
        _close(final, weighted_mean(updates, weights), error_bound(secure["fraction_bits"]) + 1e-6)
        _nothing_reveals_an_update(coord, devices[0].run_id, devices[:5], updates)
    finally:
        coord.stop()


def _nothing_reveals_an_update(coord: CoordinatorProcess, run_id: str, devices: list[SimDevice],
                               updates: list[dict[str, np.ndarray]]) -> None:
    """Try to recover each device's update from everything the coordinator keeps (its blobs, its
    database, its log), as an operator would: with the coordinator's own code, rebuild every secret
    the reveals allow (each uploader's self-mask seed, each dropped device's masking key), strip
    those masks from each masked upload and read what is left. The pairwise masks between uploaders
    remain (their keys were never revealed), so what is left is noise."""
    from cloud.secure.phases import SecureRound
    from cloud.secure.unmask import _rebuild, pair_seed, pair_sign, revealed
    from cloud.state import SqlState
    from common.protocol import SecureAggregationSpec

    root = coord.state_dir
    db_path = root / "coordinator.db"
    state = SqlState(f"sqlite:///{db_path}")
    rnd = SecureRound(state, run_id, 1, 0, SecureAggregationSpec(**SECURE))
    reveals = revealed(rnd)
    stored = {u.client_id: u for u in state.list_updates(run_id, 1)}
    blobs = [p for p in (root / "artifacts").rglob("*") if p.is_file()]
    log = (root / "coordinator.log").read_text()
    db_bytes = db_path.read_bytes()
    bits = fraction_bits(1000 * 1_000_000, SECURE["clip"])
    for device, update in zip(devices, updates, strict=True):
        truth = np.concatenate([update[k].reshape(-1).astype(np.float64) for k in sorted(update)])
        for path in blobs:  # no blob holds the update in the clear
            try:
                arrays = load_arrays(path)
            except Exception:  # not a tensor file (a tokenizer, a config)
                continue
            if sorted(arrays) == sorted(update) and all(a.dtype.kind == "f" for a in arrays.values()):
                got = np.concatenate([np.asarray(arrays[k], np.float64).reshape(-1) for k in sorted(update)])
                assert not np.allclose(got, truth, atol=0.05), f"a blob holds {device.id}'s update in the clear"
        masked = load_arrays(next(p for p in blobs if p.name == stored[device.id].sha256))
        flat = np.concatenate([np.asarray(masked[k]).reshape(-1) for k in sorted(update)]).view(np.uint64).copy()
        flat -= crypto.mask(_rebuild(rnd, device.id, "seed", reveals), flat.size)
        for dropped in set(rnd.dealers) - set(stored):
            if device.id in rnd.graph[dropped]:
                private = _rebuild(rnd, dropped, "key", reveals)
                peer = base64.b64decode(rnd.keys[device.id][1])
                stream = crypto.mask(pair_seed(private, peer, run_id, 1, device.id, dropped), flat.size)
                flat -= stream if pair_sign(device.id, dropped) > 0 else np.uint64(0) - stream
        guess = flat.view(np.int64).astype(np.float64) / (2.0 ** bits * stored[device.id].num_samples)
        assert abs(np.corrcoef(guess, truth)[0, 1]) < 0.2, f"{device.id}'s update leaks from what is kept"
        # Nor can its masking key be rebuilt: it was never revealed (only a dropped device's is).
        with pytest.raises(Exception, match="shares"):
            _rebuild(rnd, device.id, "key", reveals)
        secrets = json.loads((device.root / "secagg-1.json").read_text())
        for name in ("encryption_key", "masking_key", "seed"):
            assert secrets[name] not in log and base64.b64decode(secrets[name]) not in db_bytes
    state.close()


def test_masked_upload_alone_is_noise(tmp_path) -> None:
    """What a device uploads, read without the masks, says nothing about its update."""
    from common.protocol import SecureAggregationTask
    from common.secagg.wire import Inbox, Neighbourhood, NeighbourKeys, ReceivedShare
    from edge_sdk.secagg import SecureSession

    task = SecureAggregationTask(clip=4.0, fraction_bits=30, weight_cap=1000, threshold_fraction=0.5)
    a = SecureSession(tmp_path / "a.json", "run", 1, "a", task)
    b = SecureSession(tmp_path / "b.json", "run", 1, "b", task)
    c = SecureSession(tmp_path / "c.json", "run", 1, "c", task)
    everyone = {"a": a, "b": b, "c": c}
    bundles = {}
    for me, session in everyone.items():
        peers = sorted(set(everyone) - {me})
        hood = Neighbourhood(members=3, threshold=2, neighbours=[
            NeighbourKeys(client_id=p, index=i + 1, encryption=everyone[p].advert().encryption,
                          masking=everyone[p].advert().masking) for i, p in enumerate(peers)])
        bundles[me] = session.deal(hood)
    rng = np.random.default_rng(0)
    update = {"w": rng.normal(size=(64, 8)).astype(np.float32)}
    layout = layout_of({"w": ((64, 8), "F32")})
    inbox = Inbox(dealers=["b", "c"], shares=[ReceivedShare(sender=s, ciphertext=d.ciphertext)
                                             for s in ("b", "c") for d in bundles[s].shares if d.to == "a"])
    masked, _ = a.masked(update, layout, 1, inbox)
    as_values = masked["w"].astype(np.float64).reshape(-1)
    assert abs(np.corrcoef(as_values, update["w"].reshape(-1))[0, 1]) < 0.2
    # A tampered ciphertext is refused, not used.
    bad = Inbox(dealers=["b", "c"], shares=[ReceivedShare(sender="b", ciphertext=bytes(64)),
                                            *inbox.shares[1:]])
    with pytest.raises(SecureAggregationRefused, match="does not decrypt"):
        a.masked(update, layout, 1, bad)


def test_coordinator_crash_at_every_phase_boundary(world, tmp_path) -> None:
    # The crash after aggregation is the plain runs' (tests/test_faults.py): the same step.
    points = ["secagg_keys_closing", "secagg_shares_closing", "secagg_collecting_closing",
              "secagg_unmasking_closing"]
    spec = _spec(world, "crashes")
    coord = CoordinatorProcess(tmp_path / "coord", run=spec)
    coord.start(env={"COTUNE_FAILPOINTS": points[0]})
    try:
        devices = [SimDevice(coord.url, spec["enroll_token"], f"d{k}", tmp_path) for k in range(3)]
        info = wait_state(devices[0], "keys")
        for d in devices:
            d.keys(info)
        assert coord.wait_exit() == 137
        coord.start(env={"COTUNE_FAILPOINTS": points[1]})
        info = wait_state(devices[0], "shares")
        for d in devices:
            d.shares(info)
        assert coord.wait_exit() == 137
        coord.start(env={"COTUNE_FAILPOINTS": points[2]})
        info = wait_state(devices[0], "collecting")
        start = devices[0].start_adapter(info)
        updates, weights = _updates(start, 3, seed=5), [1, 2, 3]
        for d, upd, w in zip(devices, updates, weights, strict=True):
            d.upload(info, upd, w)
        assert coord.wait_exit() == 137
        coord.start(env={"COTUNE_FAILPOINTS": points[3]})
        info = wait_state(devices[0], "unmasking")
        for d in devices:
            d.reveal(info)
        assert coord.wait_exit() == 137
        coord.start()
        status = wait_finished(coord, devices[0].run_id)
        assert status["state"] == "finished", status["error"]
        secure = status["rounds"][-1]["metrics"]["aggregation"]["secure_aggregation"]
        final = final_adapter(coord.url, coord.admin, devices[0].run_id, tmp_path / "final.safetensors")
        _close(final, weighted_mean(updates, weights), error_bound(secure["fraction_bits"]) + 1e-6)
    finally:
        coord.stop()


def test_admin_view_is_unchanged_for_plain_runs(world, tmp_path) -> None:
    """A run without secure aggregation has no secure-aggregation endpoints to use."""
    spec = run_spec(world, name="plain", algorithm="fedavg", rounds=1, min_clients=1)
    del spec["eval_data"]
    coord = CoordinatorProcess(tmp_path / "coord", run=spec).start()
    try:
        device = SimDevice(coord.url, spec["enroll_token"], "d0", tmp_path)
        info = wait_state(device, "collecting")
        assert info.task.secure_aggregation is None
        response = httpx.get(f"{coord.url}/v1/runs/{device.run_id}/rounds/1/secagg/neighbourhood",
                             headers={"Authorization": f"Bearer {device.creds.token}"}, timeout=10)
        assert response.status_code == 409 and response.json()["detail"]["code"] == "secagg_off"
    finally:
        coord.stop()


def test_real_devices_train_under_secure_aggregation_and_local_dp(world, tmp_path) -> None:
    """`cotune edge join` devices go through every phase on their own, with local DP noise added
    before masking (the two compose: the coordinator sees neither an update nor its noise)."""
    spec = _spec(world, "devices", rounds=2, round_deadline_s=120.0,
                 secure_aggregation={"phase_deadline_s": 60.0},
                 privacy={"clip_norm": 1.0, "noise_multiplier": 0.5})
    coord = CoordinatorProcess(tmp_path / "coord", run=spec).start()
    try:
        status = join_all(coord, world, tmp_path, 3)
    finally:
        coord.stop()
    assert status["state"] == "finished", status.get("error")
    rounds = [r for r in status["rounds"] if r["round"] > 0]
    assert len(rounds) == 2
    for summary in rounds:
        secure = summary["metrics"]["aggregation"]["secure_aggregation"]
        assert (secure["uploaders"], secure["rebuilt_seeds"]) == (3, 3)
        assert summary["metrics"]["privacy_epsilon_max"] > 0
    # Each device kept no secret of a finished round.
    assert not list((tmp_path / "device-0").glob("secagg-*-1.*"))
