"""Aggregation that a minority of hostile devices cannot control (ARCHITECTURE.md, "Round state
machine"): capped weights, norm bounding, coordinate-wise median and trimmed
mean; the spec checks that refuse a rule a method's updates cannot take.

The Byzantine setting of these tests: five devices, four honest (the round's start plus a common
change plus small noise, 100 samples each) and one hostile.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cloud.store import BlobStore
from cloud.strategies import SpecError, UpdateFile, strategy_class, weighted_mean
from cloud.strategies import aggregation as agg_mod
from cloud.strategies.aggregation import aggregate, capped_weights
from common.methods import crosslm, fedavg
from common.protocol import AggregationSpec, RunSpec
from common.records import TaskRecord
from common.tensorfile import Schema, load_arrays, save_arrays
from tests.support import TinyWorld, run_spec

SHAPES = {"lora_A": (16, 8), "lora_B": (8, 24)}
SCHEMA: Schema = {name: (shape, "F32") for name, shape in SHAPES.items()}
HONEST_SAMPLES = 100


def _write(tmp_path: Path, name: str, arrays: dict[str, np.ndarray], n: int) -> UpdateFile:
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(save_arrays({k: np.asarray(v, np.float32) for k, v in arrays.items()}))
    return UpdateFile(path, n)


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[name], np.float64).ravel() for name in SHAPES])


class World:
    """The round's start, the four honest updates, and their (equally weighted) mean."""

    def __init__(self, tmp_path: Path, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.tmp = tmp_path
        self.start = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}
        self.change = {k: rng.normal(0, 0.05, s) for k, s in SHAPES.items()}
        self.honest = [{k: self.start[k] + self.change[k] + rng.normal(0, 0.005, s) for k, s in SHAPES.items()}
                       for _ in range(4)]
        # The honest updates as aggregation reads them (float32 on the wire).
        self.honest = [{k: v.astype(np.float32) for k, v in h.items()} for h in self.honest]
        self.mean = np.mean([_flat(h) for h in self.honest], axis=0)
        self.start_path = _write(tmp_path, "start", self.start, 1).path

    def hostile(self, attack: str) -> tuple[dict[str, np.ndarray], int]:
        if attack == "huge_values":
            return {k: self.start[k] + 1e6 for k in SHAPES}, HONEST_SAMPLES
        if attack == "huge_num_samples":  # the issue's attack: the largest sample count there is
            return {k: self.start[k] - 10 * self.change[k] for k in SHAPES}, 2**63 - 1
        if attack == "sign_flip":  # the honest change, reversed and scaled up
            return {k: self.start[k] - 20 * self.change[k] for k in SHAPES}, HONEST_SAMPLES
        raise ValueError(attack)

    def updates(self, attack: str) -> list[UpdateFile]:
        files = [_write(self.tmp, f"honest{i}", h, HONEST_SAMPLES) for i, h in enumerate(self.honest)]
        arrays, n = self.hostile(attack)
        return [*files, _write(self.tmp, "hostile", arrays, n)]


ATTACKS = ["huge_values", "huge_num_samples", "sign_flip"]


def _coordinatewise_bound(world: World) -> np.ndarray:
    """Median and trimmed mean (trim 0.2 of 5: one update dropped at each end), per coordinate j.

    Sort the five values of coordinate j; one of them is hostile, so the 2nd..4th smallest all lie
    within [min honest, max honest]. The median is the 3rd; the trimmed mean averages the 2nd..4th;
    both lie in that interval, and so does the honest mean M_j. Hence
        |aggregate_j - M_j| <= max_i |h_ij - M_j|   (the honest spread),
    whatever the hostile value and whatever weight it declares (these rules give one vote each).
    """
    return np.max(np.abs(np.stack([_flat(h) for h in world.honest]) - world.mean), axis=0)


def _norm_bound_bound(world: World, bound: float, w_max: float) -> float:
    """Mean with norm bound B, weights capped at w_max (max_samples_per_update), start s.

    If every honest update is within B of s (checked), only the hostile update h is changed: to
    b = s + (h - s) * min(1, B / |h - s|), so |b - s| <= B. With W_H the honest weight and w <= w_max
    the hostile's, A = (W_H M + w b) / (W_H + w), so
        A - M = w (b - M) / (W_H + w),  |b - M| <= |b - s| + |s - M| <= B + |M - s|,
        |A - M| <= w_max (B + |M - s|) / (W_H + w_max)      (w / (W_H + w) grows with w).
    """
    m_minus_s = float(np.linalg.norm(world.mean - _flat(world.start)))
    return w_max * (bound + m_minus_s) / (4 * HONEST_SAMPLES + w_max) + 1e-5


def _norm_bound_for(world: World) -> float:
    honest = [float(np.linalg.norm(_flat(h) - _flat(world.start))) for h in world.honest]
    return 1.5 * max(honest)


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_one_hostile_device_of_five_cannot_move_a_robust_rule(tmp_path: Path, rule: str, attack: str) -> None:
    world = World(tmp_path)
    updates = world.updates(attack)
    spec = AggregationSpec(rule=rule, **({"trim_fraction": 0.2} if rule == "trimmed_mean" else {}))
    bound = _coordinatewise_bound(world)

    result = _flat(aggregate(updates, SCHEMA, spec, max_samples=10**6, scratch=tmp_path).arrays)
    plain = _flat(weighted_mean(updates, SCHEMA))  # today's rule: the mean, weights as declared

    assert np.all(np.abs(result - world.mean) <= bound + 1e-6), np.max(np.abs(result - world.mean) - bound)
    assert not np.all(np.abs(plain - world.mean) <= bound + 1e-6), "the plain mean held too: the test proves nothing"
    assert not list(tmp_path.glob("aggregate-*")), "the memory-mapped stack was left on disk"


@pytest.mark.parametrize("attack", ATTACKS)
def test_one_hostile_device_of_five_cannot_move_a_norm_bounded_mean(tmp_path: Path, attack: str) -> None:
    world = World(tmp_path)
    updates = world.updates(attack)
    norm_bound = _norm_bound_for(world)
    w_max = HONEST_SAMPLES  # the run's max_samples_per_update
    limit = _norm_bound_bound(world, norm_bound, w_max)

    result = aggregate(updates, SCHEMA, AggregationSpec(norm_bound=norm_bound), max_samples=w_max,
                       reference=world.start_path)
    plain = _flat(weighted_mean(updates, SCHEMA))

    assert np.linalg.norm(_flat(result.arrays) - world.mean) <= limit
    assert np.linalg.norm(plain - world.mean) > limit, "the plain mean held too: the test proves nothing"
    assert result.figures["norm_clipped"] == 1  # the hostile update only
    assert result.figures["weights_capped"] == (1 if attack == "huge_num_samples" else 0)


def test_default_aggregation_is_todays_weighted_mean_byte_for_byte(tmp_path: Path) -> None:
    """Defaults change nothing: the same bytes as the weighted mean written before this module."""
    rng = np.random.default_rng(3)
    updates = [_write(tmp_path, f"u{i}", {k: rng.normal(size=s) for k, s in SHAPES.items()}, n)
               for i, n in enumerate([3, 17, 1, 999_999])]

    def before(files: list[UpdateFile]) -> dict[str, np.ndarray]:
        sums: dict[str, np.ndarray] = {}
        total = 0
        for update in files:
            for name, arr in load_arrays(update.path).items():
                sums[name] = sums.get(name, np.zeros(arr.shape)) + arr.astype(np.float64) * update.num_samples
            total += update.num_samples
        return {name: (acc / total).astype(np.float32) for name, acc in sums.items()}

    default = RunSpec(name="r", slm="/models/slm")
    result = aggregate(updates, SCHEMA, default.aggregation, default.max_samples_per_update)
    assert save_arrays(result.arrays) == save_arrays(before(updates))
    assert result.figures == {"rule": "mean", "updates": 4, "weights_capped": 0, "weight_share_max": 0.999979}


def test_weights_are_clipped_to_the_declared_maximum() -> None:
    assert capped_weights([5, 100, 2**63 - 1], 100) == [5.0, 100.0, 100.0]


def test_the_share_cap_lowers_only_the_largest_weights() -> None:
    # The issue's attack within the maximum: one device says 10**9 samples, four say 100.
    assert capped_weights([10**9, 100, 100, 100, 100], 10**9, 0.2) == [100.0] * 5
    assert capped_weights([1000, 10, 30], 10**6, 0.5) == [40.0, 10.0, 30.0]  # 40 = half of 40 + 10 + 30
    assert capped_weights([3, 1, 2], 10, 0.9) == [3.0, 1.0, 2.0]  # nobody above 90%: unchanged
    assert capped_weights([50, 2], 100, 0.4) == [2.0, 2.0]  # 2 x 0.4 < 1: no weighting holds, all equal
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(2, 12))
        samples = [int(x) for x in rng.integers(1, 10**6, n)]
        share = float(rng.uniform(1 / n + 1e-6, 1))
        weights = capped_weights(samples, 10**9, share)
        assert max(weights) / math.fsum(weights) <= share + 1e-12
        assert all(0 < w <= s for w, s in zip(weights, samples, strict=True))
        level = max(weights)
        # Water-filling: a weight is lowered only to the common level, never below a smaller one.
        assert all(w in (s, level) for w, s in zip(weights, samples, strict=True))


def test_a_share_cap_holds_the_aggregate_to_its_share(tmp_path: Path) -> None:
    """Weights only (no norm bound): a hostile update X weighing at most share s of the total gives
    A - M = s' (X - M) with s' <= s, so |A - M| <= s |X - M| in every coordinate."""
    world = World(tmp_path)
    arrays, _ = world.hostile("sign_flip")
    updates = [*world.updates("sign_flip")[:4], _write(tmp_path, "big", arrays, 10**6)]
    spec = AggregationSpec(max_weight_share=0.2)
    far = np.abs(_flat(arrays) - world.mean)

    result = aggregate(updates, SCHEMA, spec, max_samples=10**6)
    plain = aggregate(updates, SCHEMA, AggregationSpec(), max_samples=10**6)

    assert np.all(np.abs(_flat(result.arrays) - world.mean) <= 0.2 * far + 1e-6)
    assert result.figures["weight_share_max"] == 0.2 and result.figures["weights_capped"] == 1
    assert not np.all(np.abs(_flat(plain.arrays) - world.mean) <= 0.2 * far + 1e-6)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_robust_rules_match_an_in_memory_reference_block_by_block(tmp_path: Path, monkeypatch, rule: str) -> None:
    """Tiny blocks force many of them; tensors of several dtypes and an empty one; norm bounded."""
    monkeypatch.setattr(agg_mod, "BLOCK_BYTES", 200)
    rng = np.random.default_rng(7)
    schema: Schema = {"a": ((5, 7), "F32"), "b": ((13,), "F16"), "c": ((0,), "F32"), "d": ((3, 2, 2), "F64")}
    dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
    start = {k: rng.normal(size=s).astype(dtypes[d]) for k, (s, d) in schema.items()}
    start_path = tmp_path / "start.safetensors"
    start_path.write_bytes(save_arrays(start))
    n = 7
    raw = [{k: (start[k] + rng.normal(0, 1 + 3 * i, s)).astype(dtypes[d]) for k, (s, d) in schema.items()}
           for i in range(n)]
    files = []
    for i, arrays in enumerate(raw):
        path = tmp_path / f"u{i}.safetensors"
        path.write_bytes(save_arrays(arrays))
        files.append(UpdateFile(path, 1 + i))
    bound = 6.0

    def bounded(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        delta = {k: arrays[k].astype(np.float64) - start[k] for k in schema}
        norm = math.sqrt(sum(float(np.square(v).sum()) for v in delta.values()))
        scale = min(1.0, bound / norm)
        return {k: (start[k] + delta[k] * scale).astype(np.float32) for k in schema}

    stacked = {k: np.stack([bounded(a)[k] for a in raw]).astype(np.float64) for k in schema}
    if rule == "median":
        expected = {k: np.median(v, axis=0) for k, v in stacked.items()}
        spec = AggregationSpec(rule="median", norm_bound=bound)
    else:
        stats = pytest.importorskip("scipy.stats")  # an independent implementation of the same rule
        expected = {k: stats.trim_mean(v, 0.3, axis=0) for k, v in stacked.items()}
        spec = AggregationSpec(rule="trimmed_mean", trim_fraction=0.3, norm_bound=bound)

    result = aggregate(files, schema, spec, max_samples=10, reference=start_path, scratch=tmp_path)

    for k, (shape, _dtype) in schema.items():
        assert result.arrays[k].shape == shape and result.arrays[k].dtype == np.float32
        np.testing.assert_allclose(result.arrays[k], expected[k], rtol=1e-6, atol=1e-6)
    assert result.figures["norm_clipped"] > 0 and result.figures["rule"] == rule


def test_norm_bound_needs_the_round_start(tmp_path: Path) -> None:
    world = World(tmp_path)
    with pytest.raises(ValueError, match="starting adapter"):
        aggregate(world.updates("sign_flip"), SCHEMA, AggregationSpec(norm_bound=1.0), max_samples=100)


def test_the_strategy_bounds_against_the_adapter_the_round_published(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    spec = RunSpec(name="r", algorithm="fedavg", slm="/models/slm", min_clients=5, max_samples_per_update=100,
                   aggregation={"norm_bound": 0.5})
    strategy = strategy_class("fedavg")(spec, store)
    world = World(tmp_path)
    inputs = {fedavg.SLM_ADAPTER: store.put_bytes(world.start_path.read_bytes())}
    updates = world.updates("huge_num_samples")

    result = strategy.aggregate_round(iter(updates), inputs)

    assert result.figures["norm_clipped"] >= 1 and result.figures["weights_capped"] == 1
    direct = aggregate(updates, SCHEMA, spec.aggregation, 100, reference=world.start_path)
    assert save_arrays(result.arrays) == save_arrays(direct.arrays)


def test_crosslm_scores_aggregate_with_capped_weights(tmp_path: Path) -> None:
    """CrossLM uploads (w*s, w) per sample; its weighted mean still pairs each device's two
    tensors, and a device that declares 2**40 samples weighs only the run's maximum."""
    store = BlobStore(tmp_path / "store")
    spec = RunSpec(name="r", algorithm="crosslm", slm="/models/slm", llm="/models/llm", max_samples_per_update=50,
                   aggregation={"max_weight_share": 0.5})
    strategy = strategy_class("crosslm")(spec, store)
    samples = [crosslm.Sample(TaskRecord(f"p{i}", f"r{i}"), group=i) for i in range(4)]
    inputs = {crosslm.SYNTHETIC: store.put_bytes(crosslm.samples_to_bytes(samples))}
    scores = [np.array([0.9, 0.8, 0.1, 0.2]), np.array([0.7, 0.9, 0.2, 0.1]), np.array([0.0, 0.0, 1.0, 1.0])]
    weights = [np.array([1.0, 1.0, 0.5, 0.5]), np.array([1.0, 1.0, 1.0, 1.0]), np.array([1.0, 1.0, 1.0, 1.0])]
    declared = [30, 20, 2**40]
    files = [_write(tmp_path, f"c{i}", {crosslm.SCORE_TENSOR: w * s, crosslm.WEIGHT_TENSOR: w}, n)
             for i, (s, w, n) in enumerate(zip(scores, weights, declared, strict=True))]

    result = strategy.aggregate_round(files, inputs)

    # 2**40 -> 50 (the maximum) -> 50 = half of 30 + 20 + 50 (the share cap holds already).
    capped = [30.0, 20.0, 50.0]
    for name in (crosslm.SCORE_TENSOR, crosslm.WEIGHT_TENSOR):
        tensors = [np.asarray(load_arrays(f.path)[name], np.float64) for f in files]
        by_hand = sum(c * t for c, t in zip(capped, tensors, strict=True)) / sum(capped)
        np.testing.assert_allclose(result.arrays[name], by_hand, rtol=1e-6)
    assert result.figures["weights_capped"] == 1 and result.figures["weight_share_max"] == 0.5


# -- which rules a run may choose -----------------------------------------------------------


def _spec(world: TinyWorld, algorithm: str, **fields) -> RunSpec:
    return RunSpec.model_validate(run_spec(world, name="agg", algorithm=algorithm, **fields))


@pytest.mark.parametrize("aggregation, words", [
    ({"rule": "median"}, "rule 'median' works coordinate by coordinate"),
    ({"rule": "trimmed_mean"}, "rule 'trimmed_mean' works coordinate by coordinate"),
    ({"norm_bound": 1.0}, "remove norm_bound"),
])
def test_crosslm_refuses_rules_its_scores_cannot_take(world: TinyWorld, aggregation, words: str) -> None:
    spec = _spec(world, "crosslm", min_clients=5, aggregation=aggregation)
    with pytest.raises(SpecError, match=words) as info:
        strategy_class("crosslm").check_spec(spec)
    assert "weighted_score, weight, not an adapter" in str(info.value)
    strategy_class("crosslm").check_spec(_spec(world, "crosslm", min_clients=5,
                                               aggregation={"max_weight_share": 0.25}))


def test_adapter_methods_take_every_rule_a_quorum_can_hold(world: TinyWorld) -> None:
    for algorithm in ("fedavg", "fedcollm"):
        check = strategy_class(algorithm).check_spec
        check(_spec(world, algorithm, min_clients=3, aggregation={"rule": "median", "norm_bound": 2.0}))
        check(_spec(world, algorithm, min_clients=5, aggregation={"rule": "trimmed_mean"}))
        check(_spec(world, algorithm, min_clients=4, aggregation={"max_weight_share": 0.25, "norm_bound": 1.0}))
        with pytest.raises(SpecError, match="median' of 2 updates is their mean.*min_clients to at least 3"):
            check(_spec(world, algorithm, min_clients=2, aggregation={"rule": "median"}))
        with pytest.raises(SpecError, match=r"trim_fraction 0.2 drops no update.*at least 1/min_clients \(0.25\)"):
            check(_spec(world, algorithm, min_clients=4, aggregation={"rule": "trimmed_mean"}))
        with pytest.raises(SpecError, match=r"max_weight_share 0.3 cannot hold.*at least 0.5, or min_clients to "
                                            r"at least 4"):
            check(_spec(world, algorithm, min_clients=2, aggregation={"max_weight_share": 0.3}))


def test_the_aggregation_spec_refuses_settings_of_another_rule() -> None:
    from pydantic import ValidationError

    for bad in ({"rule": "median", "trim_fraction": 0.2}, {"rule": "median", "max_weight_share": 0.5},
                {"rule": "mean", "trim_fraction": 0.1}, {"norm_bound": float("inf")}, {"norm_bound": 0},
                {"rule": "trimmed_mean", "trim_fraction": 0.5}, {"rule": "mode"}, {"max_weight_share": 1.5}):
        with pytest.raises(ValidationError):
            AggregationSpec.model_validate(bad)
    with pytest.raises(ValidationError):
        RunSpec(name="r", slm="/m", max_samples_per_update=0)
    assert json.loads(RunSpec(name="r", slm="/m").model_dump_json())["aggregation"]["rule"] == "mean"


# -- through a live coordinator over HTTP ---------------------------------------------------


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    from tests.support import CoordinatorProcess

    proc = CoordinatorProcess(tmp_path_factory.mktemp("coord")).start()
    yield proc
    proc.stop()


def _create_run(coord, world: TinyWorld, name: str, **fields):
    import httpx

    spec = run_spec(world, name=name, algorithm="fedavg", rounds=2, min_clients=5, eval_data=None, **fields)
    return spec, httpx.post(f"{coord.url}/v1/runs", json=spec, headers=coord.admin, timeout=300)


def _byzantine_round(coord, world: TinyWorld, tmp_path: Path, name: str, **fields):
    """Five devices of a new run send round 1: four honest (40 samples), one hostile that
    declares the run's maximum; returns the honest mean, the hostile update and round 2's adapter."""
    import time

    from common.protocol import META_NUM_SAMPLES, DeviceProfile
    from edge_sdk.client import CoordinatorClient

    spec, created = _create_run(coord, world, name, **fields)
    assert created.status_code == 201, created.text
    clients = [CoordinatorClient(coord.url) for _ in range(5)]
    try:
        creds = [c.register(spec["enroll_token"], f"dev{k}", DeviceProfile()) for k, c in enumerate(clients)]
        run_id = creds[0].run_id

        def adapter(number: int) -> dict[str, np.ndarray]:
            info = clients[0].current_round(run_id)
            assert info.round == number
            ref = next(r for r in info.artifacts if r.name == fedavg.SLM_ADAPTER)
            path = clients[0].download(ref, tmp_path / f"{name}-{number}.safetensors")
            return {k: np.asarray(v, np.float64) for k, v in load_arrays(path).items()}

        start = adapter(1)
        rng = np.random.default_rng(1)
        change = {k: rng.normal(0, 0.05, v.shape) for k, v in start.items()}
        honest = [{k: (v + change[k] + rng.normal(0, 0.005, v.shape)).astype(np.float32) for k, v in start.items()}
                  for _ in range(4)]
        hostile = {k: (v + 0.5).astype(np.float32) for k, v in start.items()}
        maximum = RunSpec.model_validate(spec).max_samples_per_update
        for client, cred, (arrays, n) in zip(clients, creds, [*((h, 40) for h in honest), (hostile, maximum)],
                                             strict=True):
            client.upload_update(run_id, 1, cred.client_id, save_arrays(arrays, {META_NUM_SAMPLES: str(n)}))
        deadline = time.monotonic() + 120
        while clients[0].current_round(run_id).round == 1 and time.monotonic() < deadline:
            time.sleep(0.2)

        def flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
            return np.concatenate([np.asarray(arrays[k], np.float64).ravel() for k in sorted(start)])

        return np.mean([flat(h) for h in honest], axis=0), flat(hostile), flat(adapter(2))
    finally:
        for client in clients:
            client.close()


def test_a_device_declaring_the_most_samples_is_held_to_its_share_over_http(coord, world, tmp_path) -> None:
    """The issue's attack within the declared maximum: one device of five says 10**6 samples
    (the default max_samples_per_update), four say 40. With max_weight_share s = 0.2 the hostile
    update X weighs at most s of the total, so A - M = s' (X - M) with s' <= s (see
    test_a_share_cap_holds_the_aggregate_to_its_share): |A - M| <= 0.2 |X - M| per coordinate.
    The same round without the cap makes the next adapter (nearly) the hostile update."""
    mean, hostile, capped = _byzantine_round(coord, world, tmp_path, "capped",
                                             aggregation={"max_weight_share": 0.2})
    assert np.all(np.abs(capped - mean) <= 0.2 * np.abs(hostile - mean) + 1e-6)

    mean, hostile, uncapped = _byzantine_round(coord, world, tmp_path, "uncapped")
    assert not np.all(np.abs(uncapped - mean) <= 0.2 * np.abs(hostile - mean) + 1e-6)
    np.testing.assert_allclose(uncapped, hostile, atol=1e-3)  # 10**6 of 10**6 + 160 samples


def test_a_rule_the_method_cannot_take_is_refused_at_run_creation(coord, world) -> None:
    import httpx

    spec = run_spec(world, name="crosslm-median", algorithm="crosslm", min_clients=5, eval_data=None,
                    aggregation={"rule": "median"})
    r = httpx.post(f"{coord.url}/v1/runs", json=spec, headers=coord.admin, timeout=60)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail["code"] == "invalid_spec"
    assert "crosslm devices upload weighted_score, weight, not an adapter" in detail["message"]
    runs = httpx.get(f"{coord.url}/v1/runs", headers=coord.admin, timeout=10).json()
    assert "crosslm-median" not in {run["name"] for run in runs}
