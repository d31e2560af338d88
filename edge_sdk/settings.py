"""A device's join settings, the coordinator's way (ARCHITECTURE.md, "Layers"): flags over
COTUNE_EDGE_* environment variables over a TOML file (`cotune edge join --config`) over defaults."""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any

import tomllib
from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# The TOML file `load_device_settings` reads, for the source that sits below the environment.
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("cotune_edge_config", default=None)


class DeviceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COTUNE_EDGE_", env_nested_delimiter="__", extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: flags (init), then the environment, then the config file.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=_config_file.get()))

    coordinator: str = Field(..., description="coordinator URL, e.g. http://10.0.0.2:8080")
    enroll_token: str = Field(..., description="the run's enroll token")
    data: Path = Field(..., description="private JSONL of {prompt, response}; never leaves the device")
    eval_data: Path | None = Field(None, description="local held-out JSONL, scored each round")
    name: str = Field("device", min_length=1, max_length=128)
    state_dir: Path = Field(Path(".cotune/edge"), description="credentials, cache and pending updates")
    out_dir: Path | None = Field(None, description="where the final model and adapter go")
    poll_s: float = Field(1.0, gt=0, description="seconds between polls while waiting")
    progress: bool = True
    ca_cert: Path | None = Field(None, description="PEM CA bundle to trust for an https coordinator")
    local_slm: Path | None = Field(None, description="this device's own SLM checkpoint (co-plms, crosslm)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads")


def load_device_settings(config: Path | None = None, **flags: Any) -> DeviceSettings:
    """Settings from `flags` (None means not given) over COTUNE_EDGE_* variables over the TOML
    `config` over defaults."""
    if config is not None:
        try:
            tomllib.loads(config.read_text())  # the source skips a missing file; say so instead
        except FileNotFoundError:
            raise ValueError(f"config file {config} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {config} is not valid TOML: {exc}") from None
    token = _config_file.set(config)
    try:
        return DeviceSettings(**{key: value for key, value in flags.items() if value is not None})
    finally:
        _config_file.reset(token)
