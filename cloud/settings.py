"""Coordinator settings (ARCHITECTURE.md, "Layers"): flags over environment variables
(COTUNE_*, COTUNE_RUN__ROUNDS for a field of the run) over a TOML config file over defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.protocol import RunSpec
from common.settings import LayeredSettings, load_layered


class CoordinatorSettings(LayeredSettings):
    model_config = SettingsConfigDict(env_prefix="COTUNE_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    state_url: str = Field(
        "sqlite:///.cotune/coordinator.db",
        description="SQLAlchemy URL: a SQLite file (default) or postgresql+psycopg://...",
    )
    artifact_dir: Path = Path(".cotune/artifacts")
    work_dir: Path = Field(Path(".cotune/work"), description="scratch space for uploads in flight")
    admin_token: str | None = Field(
        None, min_length=16, description="bearer token for run management; generated if unset"
    )
    tls_certfile: Path | None = Field(None, description="PEM certificate: serve HTTPS (with tls_keyfile)")
    tls_keyfile: Path | None = Field(None, description="PEM private key of tls_certfile")
    max_update_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    max_json_bytes: int = Field(
        1024 * 1024, ge=1024, description="largest JSON body a device or an enrolling device may send; "
        "a larger one is refused with 413 before it is parsed")
    max_admin_json_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="largest JSON body the admin may send (a RunSpec, a build request)")
    metrics_public: bool = Field(
        False, description="serve /metrics without the admin token (for a scraper on a private network)")
    tick_s: float = Field(0.5, gt=0, description="how often the round driver looks at the runs")
    torch_threads: int | None = Field(None, ge=1)
    instance_id: str | None = Field(
        None, max_length=128,
        description="names this replica in leases; stable across restarts (default: host:port)",
    )
    lease_s: float = Field(
        600.0, gt=0, description="how long a replica's lease on a slow step lasts unrenewed; the holder renews "
        "it every lease_s/3 while the step runs, so only a replica that died or stalled loses it",
    )
    generate_rate_per_minute: float = Field(
        30.0, gt=0, description="POST /v1/generate: requests per minute one device may make, on average")
    generate_burst: int = Field(
        10, ge=1, description="POST /v1/generate: requests one device may make at once before the rate applies")
    generate_queue: int = Field(
        8, ge=1, description="POST /v1/generate: requests that may wait for (or hold) the held models at once; "
        "past it 429, so generation never ties up all of the server's worker threads (40)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="the coordinator's and uvicorn's log level; at info uvicorn logs each request")
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object a line (time, level, logger, message), for a log collector")
    run: RunSpec | None = Field(None, description="a run to create at start-up if it does not exist")


def check_tls(settings: CoordinatorSettings) -> None:
    if (settings.tls_certfile is None) != (settings.tls_keyfile is None):
        raise ValueError("TLS needs both tls_certfile and tls_keyfile")
    for path in (settings.tls_certfile, settings.tls_keyfile):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"TLS file {path} does not exist")


def load_settings(config: Path | None = None, **overrides: Any) -> CoordinatorSettings:
    """Settings from `overrides` (flags; None means not given) over COTUNE_* environment
    variables over the TOML `config` (top-level keys and an optional [run] table) over defaults.
    The [run] table merges key by key across them: a flag or COTUNE_RUN__ROUNDS changes one field."""
    return load_layered(CoordinatorSettings, config, overrides)
