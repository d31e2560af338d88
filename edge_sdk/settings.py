"""A device's join settings, the coordinator's way (ARCHITECTURE.md, "Layers"): flags over
COTUNE_EDGE_* environment variables over a TOML file (`cotune edge join --config`) over defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from common.ml.device import check_device
from common.settings import LayeredSettings, load_layered


class DeviceSettings(LayeredSettings):
    model_config = SettingsConfigDict(env_prefix="COTUNE_EDGE_", env_nested_delimiter="__", extra="forbid")

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
    # Like threads, not part of the worker's JoinConfig (exclude): the CLI hands it on itself.
    device: str = Field("auto", exclude=True, description="where local training runs: auto (cuda when torch sees "
                        "a GPU, else cpu), cpu, cuda or cuda:N")

    @field_validator("device")
    @classmethod
    def _device_word(cls, value: str) -> str:
        return check_device(value)


def load_device_settings(config: Path | None = None, **flags: Any) -> DeviceSettings:
    """Settings from `flags` (None means not given) over COTUNE_EDGE_* variables over the TOML
    `config` over defaults."""
    return load_layered(DeviceSettings, config, flags)
