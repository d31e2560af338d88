"""Coordinator settings: flags > environment > config file > defaults, nested environment
variables for the run table, and JSON log lines."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import httpx
import pytest

from cloud.logs import JsonFormatter
from cloud.settings import CoordinatorSettings, load_settings
from tests.support import CoordinatorProcess

DEFAULT_PORT = CoordinatorSettings.model_fields["port"].default


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return _config(tmp_path, 'port = 9001\nlog_level = "warning"\n\n[run]\nname = "from-file"\n'
                             'algorithm = "fedavg"\nslm = "slm-dir"\nrounds = 2\n\n[run.lora]\nr = 4\n')


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COTUNE_PORT", "COTUNE_LOG_LEVEL", "COTUNE_LOG_FORMAT", "COTUNE_RUN", "COTUNE_RUN__ROUNDS",
                 "COTUNE_RUN__NAME", "COTUNE_RUN__LORA__R"):
        monkeypatch.delenv(name, raising=False)


def test_config_file_beats_defaults(config: Path) -> None:
    assert DEFAULT_PORT != 9001
    assert load_settings(config).port == 9001
    assert load_settings().port == DEFAULT_PORT


def test_environment_beats_config_file(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COTUNE_PORT", "9002")
    monkeypatch.setenv("COTUNE_LOG_LEVEL", "debug")
    settings = load_settings(config)
    assert (settings.port, settings.log_level) == (9002, "debug")


def test_environment_beats_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COTUNE_LOG_FORMAT", "json")
    assert load_settings().log_format == "json"


def test_flags_beat_environment_and_config_file(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COTUNE_PORT", "9002")
    assert load_settings(config, port=9003).port == 9003
    assert load_settings(config, log_level="error").log_level == "error"
    assert load_settings(None, port=9004).port == 9004


def test_a_flag_left_out_changes_nothing(config: Path) -> None:
    assert load_settings(config, port=None, log_level=None).port == 9001


def test_nested_environment_sets_one_field_of_the_run(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COTUNE_RUN__ROUNDS", "5")
    monkeypatch.setenv("COTUNE_RUN__LORA__R", "8")
    run = load_settings(config).run
    assert run is not None
    assert (run.name, run.rounds, run.lora.r) == ("from-file", 5, 8)  # the rest still from the file


def test_a_run_flag_beats_the_nested_environment(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COTUNE_RUN__NAME", "from-env")
    monkeypatch.setenv("COTUNE_RUN__ROUNDS", "5")
    run = load_settings(config, run={"name": "from-flag"}).run
    assert run is not None
    assert (run.name, run.rounds) == ("from-flag", 5)


def test_a_run_from_the_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"NAME": "env-run", "ALGORITHM": "fedavg", "SLM": "slm-dir", "ROUNDS": "3"}.items():
        monkeypatch.setenv(f"COTUNE_RUN__{key}", value)
    run = load_settings().run
    assert run is not None
    assert (run.name, run.rounds) == ("env-run", 3)


def test_bad_values_are_refused_with_the_field_named(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COTUNE_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="log_format"):
        load_settings(config)


def test_a_missing_or_broken_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_settings(_config(tmp_path, "port = = 1\n"))


def test_unknown_keys_in_the_config_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prot"):
        load_settings(_config(tmp_path, "prot = 9001\n"))


def test_a_json_log_line_is_json_with_level_logger_and_message() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("cotune.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("round %d: %s", 3, 'a "quoted"\nline')
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert (first["level"], first["logger"], first["message"]) == ("warning", "cotune.test-json",
                                                                    'round 3: a "quoted"\nline')
    assert first["time"].endswith("+00:00")
    assert "RuntimeError: boom" in second["exception"]


def test_serve_writes_json_access_logs_when_asked(tmp_path: Path) -> None:
    coord = CoordinatorProcess(tmp_path / "coord").start(env={"COTUNE_LOG_FORMAT": "json"})
    try:
        assert httpx.get(f"{coord.url}/healthz", timeout=10).status_code == 200
    finally:
        coord.stop()
    lines = [json.loads(line) for line in coord.log_tail(200).splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "uvicorn.access" and "/healthz" in line["message"]]
    assert access and access[0]["level"] == "info"


# -- a device's join settings: the same order ------------------------------------------------


@pytest.fixture
def device_config(tmp_path: Path) -> Path:
    path = tmp_path / "device.toml"
    path.write_text('coordinator = "http://file:1"\nenroll_token = "file-token"\ndata = "file.jsonl"\n'
                    'name = "from-file"\npoll_s = 2.0\n')
    return path


def test_device_settings_in_the_same_order(device_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_sdk.settings import load_device_settings

    for name in ("COTUNE_EDGE_NAME", "COTUNE_EDGE_POLL_S", "COTUNE_EDGE_COORDINATOR"):
        monkeypatch.delenv(name, raising=False)
    from_file = load_device_settings(device_config)
    assert (from_file.name, from_file.poll_s, from_file.state_dir) == ("from-file", 2.0, Path(".cotune/edge"))
    monkeypatch.setenv("COTUNE_EDGE_NAME", "from-env")
    monkeypatch.setenv("COTUNE_EDGE_POLL_S", "3")
    from_env = load_device_settings(device_config)
    assert (from_env.name, from_env.poll_s, from_env.coordinator) == ("from-env", 3.0, "http://file:1")
    from_flag = load_device_settings(device_config, name="from-flag", poll_s=None)
    assert (from_flag.name, from_flag.poll_s) == ("from-flag", 3.0)


def test_device_settings_name_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_sdk.settings import load_device_settings

    monkeypatch.delenv("COTUNE_EDGE_COORDINATOR", raising=False)
    with pytest.raises(ValueError, match="coordinator"):
        load_device_settings(None, enroll_token="t" * 20, data=tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="does not exist"):
        load_device_settings(tmp_path / "nope.toml")
