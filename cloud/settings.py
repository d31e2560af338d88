"""Coordinator settings (ARCHITECTURE.md, "Layers"): flags over environment variables
(COTUNE_*, COTUNE_RUN__ROUNDS for a field of the run) over a TOML config file over defaults."""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from cloud.blobstores.s3url import SCHEME, is_s3_url, parse_s3_url
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
    artifact_dir: str = Field(
        ".cotune/artifacts", min_length=1,
        description="the content-addressed blob store: a local directory, or s3://bucket/prefix for an "
        "S3-compatible bucket that replicas on several machines share (cloud/store.py)",
    )
    artifact_cache_dir: Path | None = Field(
        None, description="with an s3:// artifact_dir: the local cache of the blobs this replica reads "
        "(default: work_dir/artifact-cache)")
    artifact_cache_bytes: int = Field(
        10 * 1024**3, ge=0, description="with an s3:// artifact_dir: the cache's size; past it the blobs used "
        "least recently are dropped (never one handed out in the last hour)")
    s3_endpoint_url: str | None = Field(
        None, description="an S3-compatible server (MinIO, Ceph, R2...), e.g. http://minio:9000; unset: AWS S3")
    s3_region: str | None = Field(None, description="the bucket's region; unset: boto3's default chain")
    s3_access_key_id: str | None = Field(
        None, description="unset: boto3's default chain (AWS_ACCESS_KEY_ID, ~/.aws, an instance role)")
    s3_secret_access_key: SecretStr | None = Field(None, description="the secret of s3_access_key_id")
    work_dir: Path = Field(
        Path(".cotune/work"), description="scratch space for uploads in flight; with an s3:// artifact_dir also "
        "where the token files and (by default) the artifact cache are kept")
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
    model_device: str = Field(
        "auto", description="where the held models (LLM, server-side SLM) run: auto (cuda when torch sees a GPU, "
        "else cpu), cpu, cuda or cuda:N")
    model_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="the held models' precision; float16 needs a GPU, bfloat16 on the CPU halves "
        "memory but is slower than float32 there")
    model_device_map: Literal["none", "auto"] = Field(
        "none", description="auto: accelerate spreads an LLM too large for one GPU over every visible GPU "
        "(needs accelerate and CUDA)")
    run: RunSpec | None = Field(None, description="a run to create at start-up if it does not exist")

    @field_validator("artifact_dir", mode="before")
    @classmethod
    def _artifact_location(cls, value: Any) -> Any:
        if isinstance(value, PurePath):
            # A path collapses "s3://b/p" to "s3:/b/p" (as a --artifact-dir typed as a path does).
            text = str(value)
            return SCHEME + text[len("s3:/"):] if text.startswith("s3:/") and not is_s3_url(text) else text
        return value

    @field_validator("artifact_dir")
    @classmethod
    def _bucket_url(cls, value: str) -> str:
        if is_s3_url(value):
            parse_s3_url(value)  # a ValueError saying what is wrong with it
        return value

    @field_validator("model_device")
    @classmethod
    def _device_word(cls, value: str) -> str:
        from common.ml.device import check_device

        return check_device(value)

    @model_validator(mode="after")
    def _check_models(self) -> CoordinatorSettings:
        # What can be refused without torch; what the machine lacks is refused at the first load.
        from common.ml.device import check_accelerate

        if self.model_device == "cpu" and self.model_dtype == "float16":
            raise ValueError("model_dtype float16 on model_device cpu is refused: CPU kernels mostly upcast it "
                             "(slower than float32) and it is too narrow to train safely; use bfloat16 or float32")
        if self.model_device_map == "auto":
            if self.model_device not in ("auto", "cuda"):
                raise ValueError(f"model_device_map auto places the models over every visible GPU itself; "
                                 f"model_device {self.model_device!r} cannot hold with it: set model_device auto "
                                 "(choose GPUs with CUDA_VISIBLE_DEVICES) or model_device_map none")
            check_accelerate()
        return self

    @model_validator(mode="after")
    def _check_store(self) -> CoordinatorSettings:
        if not is_s3_url(self.artifact_dir):
            given = [name for name in ("s3_endpoint_url", "s3_region", "s3_access_key_id", "s3_secret_access_key")
                     if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} set, but artifact_dir {self.artifact_dir!r} is a local "
                                 "directory; set artifact_dir to s3://bucket/prefix, or leave the s3_* settings unset")
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError("s3_access_key_id and s3_secret_access_key go together; set both, or neither "
                             "(boto3's default chain then supplies them)")
        return self


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
