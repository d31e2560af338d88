"""A device's join and serve settings, the coordinator's way (ARCHITECTURE.md, "Layers"): flags
over COTUNE_EDGE_* (join) or COTUNE_SERVE_* (serve) environment variables over a TOML file
(`--config`) over defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

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


class ServeSettings(LayeredSettings):
    """`cotune edge serve`: flags over COTUNE_SERVE_* environment variables over a TOML file
    (`--config`) over these defaults, so the server runs like a service (docs/deploy.md)."""

    model_config = SettingsConfigDict(env_prefix="COTUNE_SERVE_", env_nested_delimiter="__", extra="forbid")

    build: Path = Field(..., description="build directory (with manifest.json), or a .gguf file")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=1, le=65535)
    model_name: str | None = Field(None, description="model id clients ask for (default: the build's name)")
    adapters: list[Path] = Field(default_factory=list, description="GGUF LoRA builds offered as MODEL:NAME")
    n_ctx: int | None = Field(None, ge=16, description="context window in tokens")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: all usable cores)")
    verify: Literal["size", "sha256", "none"] = "size"
    flash_attn: bool | None = Field(None, description="llama.cpp flash attention (default: auto)")
    coordinator: str | None = Field(None, description="coordinator URL: escalate to its LLM when unsure")
    credentials: Path = Field(Path(".cotune/edge/credentials.json"),
                              description="credentials file from `cotune edge join` (used with coordinator)")
    signal: Literal["mean_entropy", "max_entropy", "mean_nll"] = "mean_entropy"
    threshold: float = Field(2.0, description="escalate when the signal is above this")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body accepted")
    max_queue: int = Field(32, ge=1, description="requests that may wait for the model at once")
    gpu_layers: str = Field("auto", description="llama.cpp layers on the GPU: auto, all or a number")
    providers: str = Field("auto", description="ONNX Runtime providers: auto, cpu, cuda, tensorrt or names")


def load_serve_settings(config: Path | None = None, **flags: Any) -> ServeSettings:
    """Settings from `flags` (None means not given) over COTUNE_SERVE_* variables over the TOML
    `config` over defaults."""
    return load_layered(ServeSettings, config, flags)


def load_device_settings(config: Path | None = None, **flags: Any) -> DeviceSettings:
    """Settings from `flags` (None means not given) over COTUNE_EDGE_* variables over the TOML
    `config` over defaults."""
    return load_layered(DeviceSettings, config, flags)
