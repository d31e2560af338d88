"""The method registry and contracts: one place per method, lazily resolved, and the hooks the
coordinator core asks instead of knowing artifact names."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from cloud.store import BlobStore
from cloud.strategies import SpecError, strategy_class
from common.methods import coplms, crosslm, fedavg, fedcollm, get_method, method_names, register_method
from common.methods.contract import LLM_PREFIX, MethodContract
from common.protocol import RunSpec
from edge_sdk.handlers import handler_for

BUILTIN = {"fedavg": fedavg, "fedcollm": fedcollm, "co-plms": coplms, "crosslm": crosslm}


def _spec(algorithm: str, **fields) -> RunSpec:
    # Paths are never opened by the hooks tested here.
    return RunSpec(name="m", algorithm=algorithm, slm="/models/slm", llm="/models/llm", **fields)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> BlobStore:
    return BlobStore(tmp_path_factory.mktemp("store"))


def _strategy(store: BlobStore, algorithm: str, **fields):
    return strategy_class(algorithm)(_spec(algorithm, **fields), store)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_each_method_is_one_registry_entry(name: str) -> None:
    method = get_method(name)
    assert method.contract is BUILTIN[name].CONTRACT
    cls = strategy_class(name)
    assert cls.contract is method.contract and cls.name == name
    assert cls.task_kind == method.contract.task_kind and cls.update_artifact == method.contract.update_artifact
    assert handler_for(method.contract.task_kind).kind == method.contract.task_kind
    # The LLM's adapter is the server's alone.
    assert not method.contract.client_visible(f"{LLM_PREFIX}/adapter.safetensors")


def test_unknown_names_keep_their_messages() -> None:
    with pytest.raises(SpecError, match="unknown algorithm 'nope'; choose one of co-plms, crosslm, fedavg") as info:
        strategy_class("nope")
    assert "fedcollm" in str(info.value)
    with pytest.raises(RuntimeError, match="task kind 'nope'.*it knows coplms, crosslm, lora_sft.*upgrade cotune"):
        handler_for("nope")


def test_a_device_never_imports_coordinator_code() -> None:
    code = ("import sys\nfrom edge_sdk.handlers import handler_for, task_kinds\n"
            "[handler_for(k) for k in task_kinds()]\n"
            "assert not [m for m in sys.modules if m == 'cloud' or m.startswith('cloud.')], sys.modules\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_registrations_that_would_split_a_method_are_refused() -> None:
    register_method(fedavg.CONTRACT, strategy="cloud.strategies.fedavg:FedAvg",
                    handler=fedavg.LORA_SFT_HANDLER)  # the same again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_method(fedavg.CONTRACT, strategy="elsewhere:FedAvg", handler=fedavg.LORA_SFT_HANDLER)
    other = MethodContract(name="other", task_kind="lora_sft", update_artifact="x/a", published_prefixes=("x",),
                           client_prefixes=("x",), builds_on=None)
    with pytest.raises(ValueError, match="task kind 'lora_sft' is already handled"):
        register_method(other, strategy="elsewhere:S", handler="elsewhere:H")
    with pytest.raises(ValueError, match="import path"):
        register_method(other, strategy="no-colon", handler="elsewhere:H")
    assert "other" not in method_names()


def test_contracts_check_themselves() -> None:
    with pytest.raises(ValueError, match="published prefixes"):
        MethodContract(name="bad", task_kind="k", update_artifact="y/a", published_prefixes=("x",),
                       client_prefixes=("x",), builds_on=None)
    with pytest.raises(ValueError, match="stay on the server"):
        MethodContract(name="bad", task_kind="k", update_artifact="x/a", published_prefixes=("x",),
                       client_prefixes=("x",), llm_adapter="x/llm", builds_on=None)
    with pytest.raises(ValueError, match="export_adapter"):
        MethodContract(name="bad", task_kind="k", update_artifact="x/a", published_prefixes=("x",),
                       client_prefixes=("x",), builds_on="server")


def test_served_and_exported_models(store: BlobStore) -> None:
    outputs = {fedcollm.SLM_ADAPTER: "a" * 64, fedcollm.LLM_ADAPTER: "b" * 64, coplms.DPM_ADAPTER: "c" * 64}
    assert _strategy(store, "fedavg").llm_adapter(outputs) is None
    for name in ("fedcollm", "co-plms", "crosslm"):
        served = _strategy(store, name).llm_adapter(outputs)
        assert served is not None and served.checkpoint == "/models/llm" and served.adapter_digest == "b" * 64
    for name in ("fedavg", "fedcollm"):
        exported = _strategy(store, name).exportable_model(outputs)
        assert exported is not None and exported.checkpoint == "/models/slm" and exported.adapter_digest == "a" * 64
    for name in ("co-plms", "crosslm"):
        assert _strategy(store, name).exportable_model(outputs) is None


def test_build_targets_go_where_the_method_builds(store: BlobStore) -> None:
    fedavg_task = _strategy(store, "fedavg", builds=["gguf:q8_0"]).client_task(1)
    assert fedavg_task.builds == [], "server-built methods do not ask devices to build"
    task = _strategy(store, "co-plms", builds=["gguf:q8_0", "onnx:int8"]).client_task(2)
    assert task.kind == "coplms" and task.builds == ["gguf:q8_0", "onnx:int8"]
    assert task.params == coplms.CoPlmsDeviceParams().model_dump()
    assert _strategy(store, "crosslm", builds=["gguf:f32"]).client_task(1).builds == ["gguf:f32"]


@pytest.mark.parametrize(("name", "builds", "needle"), [
    ("fedavg", ["tflite:int8"], "unknown export target"),
    ("fedavg", ["gguf:q3"], "unknown quantization"),
    ("co-plms", ["gguf-lora"], "on each device from its own SLM, which can be gguf, onnx, not gguf-lora"),
    ("crosslm", ["onnx:int8", "gguf-lora:q8_0"], "not gguf-lora"),
])
def test_builds_a_method_cannot_make_are_refused(name: str, builds: list[str], needle: str) -> None:
    with pytest.raises(SpecError, match="builds: ") as info:
        strategy_class(name).check_builds(builds)
    assert needle in str(info.value)


def test_builds_a_method_can_make_pass() -> None:
    strategy_class("fedavg").check_builds(["gguf:q4_k_m", "gguf-lora", "onnx:int4"])
    strategy_class("co-plms").check_builds(["gguf:q8_0", "onnx:int8"])
    strategy_class("crosslm").check_builds([])


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_device_metrics_are_typed(store: BlobStore, name: str) -> None:
    schema = _strategy(store, name).device_metrics_schema()
    with pytest.raises(ValidationError):
        schema.model_validate({"privacy": {"epsilon": "x", "delta": 1e-5, "releases": 1, "clip_norm": 1.0,
                                           "noise_multiplier": 1.0}})
    with pytest.raises(ValidationError):
        schema.model_validate({"local_eval_after": {"rougeL": 2.0, "em": 0.0, "n": 1}})
    # What the handlers report today validates; keys this coordinator does not know are kept.
    report = {"local_eval_before": {"rougeL": 0.5, "em": 0.0, "n": 3, "per_domain": {"a": {"rougeL": 0.5, "em": 0.0,
                                                                                         "n": 3}}},
              "privacy": {"epsilon": None, "delta": 1e-5, "releases": 2, "clip_norm": 1.0, "noise_multiplier": 0.0,
                          "update_norm": 0.3, "clipped": False},
              "from_a_newer_device": [1, 2]}
    validated = schema.model_validate(report)
    assert validated.model_dump()["from_a_newer_device"] == [1, 2]


def test_handler_reports_validate_against_their_schema() -> None:
    train = {"steps": 4, "loss_first": 5.0, "loss_last": 4.0, "loss_mean": 4.5, "num_samples": 40, "seconds": 0.2}
    fedavg.CONTRACT.device_metrics.model_validate({"train": train})
    coplms.CONTRACT.device_metrics.model_validate({
        "slm_arch": "gpt2", "dst_slm": train, "dst_proxy": train,
        "saml": {"steps": 4, "num_samples": 40, "seconds": 0.1, "aligned_vocab": [False, False],
                 "slm_loss_first": float("nan")}})
    crosslm.CONTRACT.device_metrics.model_validate({"slm_arch": "qwen2", "selected_used": 3, "synthetic": 9,
                                                    "train": train, "score_mean": None})
    with pytest.raises(ValidationError):
        crosslm.CONTRACT.device_metrics.model_validate({"selected_used": -1})


def test_round_metrics_take_the_worst_epsilon(store: BlobStore) -> None:
    strategy = _strategy(store, "fedavg")
    devices = [{"privacy": {"epsilon": 1.5}}, {"privacy": {"epsilon": None}}, {}, {"privacy": {"epsilon": 4.25}},
               {"privacy": "not a block"}]
    assert strategy.round_metrics(devices) == {"privacy_epsilon_max": 4.25}
    assert strategy.round_metrics([{}, {"privacy": {"epsilon": None}}]) == {}
    schema = strategy.device_metrics_schema()
    validated = [schema.model_validate({"privacy": {"epsilon": e, "delta": 1e-5, "releases": 1, "clip_norm": 1.0,
                                                    "noise_multiplier": 1.0}}) for e in (0.5, 2.0)]
    assert strategy.round_metrics(validated) == {"privacy_epsilon_max": 2.0}


def test_params_are_typed_for_every_method(store: BlobStore) -> None:
    for name in ("fedavg", "fedcollm"):
        with pytest.raises(SpecError, match=r"params\.anything"):
            _strategy(store, name, params={"anything": 1})
    with pytest.raises(SpecError, match=r"params\.alpha"):
        _strategy(store, "co-plms", params={"alpha": -1})
