"""LoRA aggregation modes (ARCHITECTURE.md, "LoRA aggregation"): the factor-averaging gap every
round reports, `svd` (the exact mean of the products re-factorised to rank r) and `ffa`
(A frozen at its seeded init everywhere, so the mean of B is exact)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cloud.store import BlobStore
from cloud.strategies import SpecError, UpdateFile, strategy_class
from cloud.strategies.aggregation import aggregate
from cloud.strategies.lora_products import lora_modules, truncated_factors
from common.protocol import AggregationSpec, LoraSpec, RunSpec
from common.tensorfile import Schema, TensorFileError, save_arrays
from tests.support import TinyWorld, run_spec

A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"
MEAN = AggregationSpec()


def _schema(*modules: tuple[str, int, int, int]) -> Schema:
    """(prefix, out, r, in) per module -> the update schema of its lora_A / lora_B tensors."""
    schema: dict[str, tuple[tuple[int, ...], str]] = {}
    for prefix, rows, rank, cols in modules:
        schema[f"{prefix}.lora_A.weight"] = ((rank, cols), "F32")
        schema[f"{prefix}.lora_B.weight"] = ((rows, rank), "F32")
    return schema


def _write(tmp_path: Path, name: str, arrays: dict[str, np.ndarray], n: int = 1) -> UpdateFile:
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(save_arrays({k: np.asarray(v, np.float32) for k, v in arrays.items()}))
    return UpdateFile(path, n)


def _as_read(arr: np.ndarray) -> np.ndarray:
    """A tensor as aggregation reads it: float32 on the wire, float64 in the sums."""
    return np.asarray(arr, np.float32).astype(np.float64)


def _weighted_product_mean(updates: list[dict[str, np.ndarray]], weights: list[int]) -> np.ndarray:
    total = sum(weights)
    return sum(w * (_as_read(u[B]) @ _as_read(u[A])) for u, w in zip(updates, weights, strict=True)) / total


# -- svd ---------------------------------------------------------------------------------------


def test_svd_of_a_mean_within_rank_r_is_that_mean(tmp_path: Path) -> None:
    """r = 2, B 4x2, A 2x3; the A's share one row space, so the weighted mean of B·A has rank 2.
    Small integers, so that float32 on the wire keeps that row space exactly."""
    rng = np.random.default_rng(0)
    rows = rng.integers(-3, 4, size=(2, 3)).astype(np.float64)
    updates = [{B: rng.integers(-3, 4, size=(4, 2)).astype(np.float64),
                A: rng.integers(-2, 3, size=(2, 2)) @ rows} for _ in range(3)]
    weights = [1, 2, 3]
    exact = _weighted_product_mean(updates, weights)
    assert np.linalg.matrix_rank(exact) == 2

    new_b, new_a, residual = truncated_factors(exact, 2, np.zeros((2, 3)))
    assert np.abs(new_b @ new_a - exact).max() <= 1e-10 * np.abs(exact).max()
    assert residual <= 1e-20

    files = [_write(tmp_path, f"u{i}", u, w) for i, (u, w) in enumerate(zip(updates, weights, strict=True))]
    result = aggregate(files, _schema(("base_model.model.layers.0.q_proj", 4, 2, 3)), MEAN, 10**6, lora="svd")
    got = result.arrays[B].astype(np.float64) @ result.arrays[A].astype(np.float64)
    # The published factors are float32 (the adapter's dtype on the wire): exact to float32 rounding.
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-6 * np.abs(exact).max())
    assert result.arrays[A].dtype == np.float32 and result.arrays[A].shape == (2, 3)
    assert result.figures["lora_aggregation"] == "svd"
    assert result.figures["lora_svd_residual"] < 1e-7
    assert result.figures["lora_factor_gap"] > 0.01, "averaging these factors would not give the mean product"


def test_svd_of_a_mean_past_rank_r_is_its_best_rank_r_approximation(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    updates = [{B: rng.normal(size=(4, 2)), A: rng.normal(size=(2, 3))} for _ in range(3)]
    weights = [5, 1, 2]
    exact = _weighted_product_mean(updates, weights)
    assert np.linalg.matrix_rank(exact) == 3
    u, s, vt = np.linalg.svd(exact)
    best = (u[:, :2] * s[:2]) @ vt[:2]

    new_b, new_a, residual = truncated_factors(exact, 2, np.zeros((2, 3)))
    assert np.abs(new_b @ new_a - best).max() <= 1e-10 * np.abs(exact).max()
    assert math.isclose(residual, s[2] ** 2, rel_tol=1e-10)

    files = [_write(tmp_path, f"u{i}", u_, w) for i, (u_, w) in enumerate(zip(updates, weights, strict=True))]
    result = aggregate(files, _schema(("base_model.model.layers.0.q_proj", 4, 2, 3)), MEAN, 10**6, lora="svd")
    got = result.arrays[B].astype(np.float64) @ result.arrays[A].astype(np.float64)
    np.testing.assert_allclose(got, best, rtol=0, atol=1e-6 * np.abs(exact).max())
    expected = np.linalg.norm(exact - best) / np.linalg.norm(exact)
    assert math.isclose(result.figures["lora_svd_residual"], expected, rel_tol=1e-5)


def test_svd_keeps_a_alive_past_the_mean_products_rank() -> None:
    """A rank-1 mean with r = 2: the spare direction has B' = 0 (the product is unchanged) and a
    non-zero row of A', so training can still reach it."""
    exact = np.outer([1.0, 2.0, 0.0, 1.0], [0.5, -1.0, 2.0])
    new_b, new_a, _ = truncated_factors(exact, 2, np.full((2, 3), 0.1))
    assert np.abs(new_b @ new_a - exact).max() <= 1e-12
    assert np.all(new_b[:, 1] == 0) and np.linalg.norm(new_a[1]) > 0


def test_svd_factors_other_tensors_as_the_weighted_mean(tmp_path: Path) -> None:
    """Tensors outside any A/B pair (here a bias) take the weighted mean in every mode."""
    rng = np.random.default_rng(2)
    schema = {**_schema(("m", 4, 2, 3)), "m.bias": ((4,), "F32")}
    updates = [{"m.lora_A.weight": rng.normal(size=(2, 3)), "m.lora_B.weight": rng.normal(size=(4, 2)),
                "m.bias": rng.normal(size=4)} for _ in range(2)]
    files = [_write(tmp_path, f"u{i}", u, n) for i, (u, n) in enumerate(zip(updates, [1, 3], strict=True))]
    result = aggregate(files, schema, MEAN, 10**6, lora="svd")
    bias = (_as_read(updates[0]["m.bias"]) + 3 * _as_read(updates[1]["m.bias"])) / 4
    assert np.array_equal(result.arrays["m.bias"], bias.astype(np.float32))


# -- the factor-averaging gap -----------------------------------------------------------------


def test_factor_gap_is_zero_for_identical_updates(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    same = {A: rng.normal(size=(2, 3)), B: rng.normal(size=(4, 2))}
    files = [_write(tmp_path, f"u{i}", same, n) for i, n in enumerate([1, 7, 3])]
    result = aggregate(files, _schema(("base_model.model.layers.0.q_proj", 4, 2, 3)), MEAN, 10**6)
    assert result.figures["lora_factor_gap"] < 1e-12
    assert result.figures["lora_aggregation"] == "factors"


def test_factor_gap_matches_a_hand_computation_over_all_modules(tmp_path: Path) -> None:
    """Module p: B·A is 1·1 and 3·3, mean 5, while mean(B)·mean(A) = 2·2 = 4. Module q: both
    updates 2·1, mean 2, no gap. Over both: sqrt(1^2 + 0) / sqrt(5^2 + 2^2) = 1/sqrt(29)."""
    schema = _schema(("p", 1, 1, 1), ("q", 1, 1, 1))
    one = {"p.lora_A.weight": [[1.0]], "p.lora_B.weight": [[1.0]], "q.lora_A.weight": [[1.0]],
           "q.lora_B.weight": [[2.0]]}
    two = {**one, "p.lora_A.weight": [[3.0]], "p.lora_B.weight": [[3.0]]}
    files = [_write(tmp_path, "one", {k: np.array(v) for k, v in one.items()}, 10),
             _write(tmp_path, "two", {k: np.array(v) for k, v in two.items()}, 10)]
    for rule in ("mean", "median"):  # median of two is their mean: one vote each, the same figure
        spec = AggregationSpec(rule=rule)
        result = aggregate(files, schema, spec, 10**6, scratch=tmp_path)
        assert math.isclose(result.figures["lora_factor_gap"], 1 / math.sqrt(29), rel_tol=1e-5), rule
    # Weighted like the rule: 1 sample against 3 gives mean(BA) = (1 + 27)/4 = 7, factors 2.5·2.5.
    files = [UpdateFile(files[0].path, 1), UpdateFile(files[1].path, 3)]
    result = aggregate(files, schema, MEAN, 10**6)
    assert math.isclose(result.figures["lora_factor_gap"], (7 - 6.25) / math.sqrt(49 + 4), rel_tol=1e-5)


def test_factor_gap_can_be_left_out_and_factors_mode_keeps_todays_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    files = [_write(tmp_path, f"u{i}", {A: rng.normal(size=(2, 3)), B: rng.normal(size=(4, 2))}, n)
             for i, n in enumerate([2, 5])]
    schema = _schema(("base_model.model.layers.0.q_proj", 4, 2, 3))
    with_gap = aggregate(files, schema, MEAN, 10**6)
    without = aggregate(files, schema, MEAN, 10**6, factor_gap=False)
    assert save_arrays(with_gap.arrays) == save_arrays(without.arrays)
    assert "lora_factor_gap" in with_gap.figures and "lora_factor_gap" not in without.figures


def test_lora_modules_pair_only_factors_whose_product_exists() -> None:
    schema = {**_schema(("x.q_proj", 4, 2, 3)), "lora_A": ((16, 8), "F32"), "lora_B": ((8, 24), "F32"),
              "y.lora_A.weight": ((2, 3), "F32")}
    modules = lora_modules(schema)
    assert list(modules) == ["x.q_proj"]
    assert (modules["x.q_proj"].rows, modules["x.q_proj"].rank, modules["x.q_proj"].cols) == (4, 2, 3)


# -- ffa ---------------------------------------------------------------------------------------


def test_ffa_aggregate_takes_a_from_the_round_start_and_refuses_a_changed_a(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    start = {A: rng.normal(size=(2, 3)).astype(np.float32), B: np.zeros((4, 2), np.float32)}
    reference = _write(tmp_path, "start", start).path
    schema = _schema(("base_model.model.layers.0.q_proj", 4, 2, 3))
    bs = [rng.normal(size=(4, 2)) for _ in range(3)]
    files = [_write(tmp_path, f"u{i}", {A: start[A], B: b}, n) for i, (b, n) in enumerate(zip(bs, [1, 2, 3],
                                                                                              strict=True))]
    for spec in (MEAN, AggregationSpec(rule="median"), AggregationSpec(norm_bound=0.5)):
        result = aggregate(files, schema, spec, 10**6, reference=reference, scratch=tmp_path, lora="ffa")
        assert result.arrays[A].tobytes() == start[A].tobytes()
        assert result.figures["lora_aggregation"] == "ffa"
        assert result.figures["lora_factor_gap"] < 1e-6, "with one A the mean of B is the mean of the products"
    mean_b = sum(n * _as_read(b) for b, n in zip(bs, [1, 2, 3], strict=True)) / 6
    assert np.array_equal(aggregate(files, schema, MEAN, 10**6, reference=reference, lora="ffa").arrays[B],
                          mean_b.astype(np.float32))

    moved = start[A].copy()
    moved[0, 0] = np.nextafter(moved[0, 0], np.float32(np.inf))  # one ulp is a change
    hostile = _write(tmp_path, "hostile", {A: moved, B: bs[0]}, 1)
    with pytest.raises(TensorFileError, match="lora_A stays at the round's adapter.*q_proj.lora_A") as info:
        aggregate([*files, hostile], schema, MEAN, 10**6, reference=reference, lora="ffa")
    assert info.value.code == "frozen_factor_changed"
    with pytest.raises(ValueError, match="need the round's starting adapter"):
        aggregate(files, schema, MEAN, 10**6, lora="ffa")


def test_ffa_trains_only_b_and_the_upload_check_refuses_a_changed_a(world: TinyWorld, tmp_path: Path) -> None:
    import torch

    from common.ml.checkpoint import load_checkpoint
    from common.ml.lora import adapter_state, adapter_to_bytes, attach_lora
    from common.ml.train import train_lora
    from common.protocol import TrainSpec
    from common.records import read_jsonl

    records = read_jsonl(world.data["aux"])[:16]
    model, tok = load_checkpoint(world.slm_dir)
    peft_model = attach_lora(model, LoraSpec(r=4, alpha=8.0, aggregation="ffa"), seed=7)
    grads = {name: p.requires_grad for name, p in peft_model.named_parameters() if "lora_" in name}
    assert grads and all(grads[n] == (".lora_B." in n) for n in grads)
    before = adapter_state(peft_model)
    train_lora(peft_model, tok, records, TrainSpec(lr=1e-2, batch_size=4, max_len=40, max_steps=3), seed=1)
    after = adapter_state(peft_model)
    for name in before:
        if ".lora_A." in name:
            assert torch.equal(before[name], after[name]) and before[name].numpy().tobytes() == \
                after[name].numpy().tobytes(), name
    assert any(not torch.equal(before[n], after[n]) for n in before if ".lora_B." in n), "B trained"

    # The coordinator's upload check, against the round's published adapter.
    spec = RunSpec.model_validate(run_spec(world, name="ffa", algorithm="fedavg",
                                           lora={"r": 4, "alpha": 8.0, "aggregation": "ffa"}))
    store = BlobStore(tmp_path / "store")
    strategy = strategy_class("fedavg")(spec, store)
    inputs = {strategy.update_artifact: store.put_bytes(adapter_to_bytes(before))}
    arrays = {k: v.numpy() for k, v in after.items()}
    strategy.check_update(arrays, inputs)  # B moved, A did not: taken
    name = next(n for n in arrays if ".lora_A." in n)
    arrays[name] = arrays[name] + np.float32(1e-3)
    with pytest.raises(TensorFileError, match="is 'ffa'.*lora_A") as info:
        strategy.check_update(arrays, inputs)
    assert info.value.code == "frozen_factor_changed"


def test_ffa_server_distillation_leaves_a_alone(world: TinyWorld) -> None:
    """FedCoLLM's mutual distillation trains both held models through attach_lora'd adapters."""
    import torch

    from cloud.training.distill import mutual_distillation
    from common.ml.checkpoint import load_checkpoint
    from common.ml.lora import adapter_state, attach_lora
    from common.protocol import DistillSpec
    from common.records import read_jsonl

    lora = LoraSpec(r=4, alpha=8.0, aggregation="ffa")
    slm_base, tok = load_checkpoint(world.slm_dir)
    llm_base, _ = load_checkpoint(world.llm_dir)
    slm, llm = attach_lora(slm_base, lora, seed=0), attach_lora(llm_base, lora, seed=0)
    before = {"slm": adapter_state(slm), "llm": adapter_state(llm)}
    mutual_distillation(llm, slm, tok, read_jsonl(world.data["aux"])[:16],
                        DistillSpec(lr=1e-2, batch_size=4, max_steps=2), seed=0)
    for which, model in (("slm", slm), ("llm", llm)):
        after = adapter_state(model)
        assert all(torch.equal(before[which][n], after[n]) for n in after if ".lora_A." in n), which
        assert any(not torch.equal(before[which][n], after[n]) for n in after if ".lora_B." in n), which


# -- the run spec ------------------------------------------------------------------------------


def test_the_lora_aggregation_choice_and_what_run_creation_refuses(world: TinyWorld) -> None:
    assert LoraSpec().aggregation == "factors"
    # The default goes unsaid on the wire (devices with an older LoraSpec take the task); a choice is said.
    assert "aggregation" not in LoraSpec().model_dump_json()
    assert LoraSpec.model_validate_json(LoraSpec(aggregation="svd").model_dump_json()).aggregation == "svd"
    with pytest.raises(ValueError, match="aggregation"):
        LoraSpec.model_validate({"aggregation": "mean"})

    def spec(algorithm: str, lora: str, **fields) -> RunSpec:
        return RunSpec.model_validate(run_spec(world, name="lora-agg", algorithm=algorithm,
                                               lora={"aggregation": lora}, **fields))

    fedavg = strategy_class("fedavg")
    fedavg.check_spec(spec("fedavg", "svd", min_clients=4, aggregation={"max_weight_share": 0.5}))
    fedavg.check_spec(spec("fedavg", "ffa", min_clients=3, aggregation={"rule": "median"}))
    for rule, quorum in (("median", 3), ("trimmed_mean", 5)):
        with pytest.raises(SpecError, match=f"'svd' re-factorises the weighted mean.*rule {rule!r}.*use rule 'mean'"):
            fedavg.check_spec(spec("fedavg", "svd", min_clients=quorum, aggregation={"rule": rule}))
    for mode in ("ffa", "svd"):
        with pytest.raises(SpecError, match=f"lora.aggregation {mode!r} works on the LoRA factors.*not an adapter"):
            strategy_class("crosslm").check_spec(spec("crosslm", mode, min_clients=5))
