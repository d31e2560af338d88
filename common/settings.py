"""Settings read the conventional way, for the coordinator and the device alike
(ARCHITECTURE.md, "Layers"): flags over environment variables over a TOML file over defaults."""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any, TypeVar

import tomllib
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, TomlConfigSettingsSource

# The TOML file `load_layered` is reading, for the source that sits below the environment.
# A context variable, so concurrent loads (tests, threads) never see each other's file.
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("cotune_config_file", default=None)

S = TypeVar("S", bound="LayeredSettings")


class LayeredSettings(BaseSettings):
    """Subclasses set their env prefix; construct them with `load_layered`."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: flags (init), then the environment, then the config file; containers
        # override a baked-in file with environment variables.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=_config_file.get()))


def load_layered(cls: type[S], config: Path | None, flags: dict[str, Any]) -> S:
    """`cls` from `flags` (None means not given) over its environment variables over the TOML
    `config` over defaults. A missing or broken config file is an error, not silently skipped."""
    if config is not None:
        try:
            tomllib.loads(config.read_text())
        except FileNotFoundError:
            raise ValueError(f"config file {config} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {config} is not valid TOML: {exc}") from None
    token = _config_file.set(config)
    try:
        return cls(**{key: value for key, value in flags.items() if value is not None})
    finally:
        _config_file.reset(token)
