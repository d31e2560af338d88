"""Wire models shared by the coordinator and the devices (REST API under /v1).

The coordinator imports these models, so a device and the server can never disagree
about a field. The OpenAPI document FastAPI builds from them is the real contract.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
)

API_PREFIX = "/v1"

# An update is a safetensors body; these keys of its `__metadata__` carry what is not
# a tensor. Keeping them inside the body means the digest covers them too.
META_NUM_SAMPLES = "cotune.num_samples"
META_METRICS = "cotune.metrics"
META_KIND = "cotune.kind"

SHA256_PATTERN = r"^[0-9a-f]{64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoundState(str, Enum):
    """open -> collecting -> aggregating -> server_step -> publishing -> closed, or failed
    (ARCHITECTURE.md, "Round state machine"). Under secure aggregation: open -> keys -> shares
    -> collecting -> unmasking -> aggregating -> ... (ARCHITECTURE.md, "Secure aggregation")."""

    open = "open"
    keys = "keys"  # secure aggregation: devices advertise their public keys
    shares = "shares"  # secure aggregation: devices deal encrypted shares to their neighbours
    collecting = "collecting"
    unmasking = "unmasking"  # secure aggregation: devices reveal the shares the sum needs
    aggregating = "aggregating"
    server_step = "server_step"
    publishing = "publishing"
    closed = "closed"
    failed = "failed"


class RunState(str, Enum):
    running = "running"
    finished = "finished"
    failed = "failed"
    # Ended by the admin (POST /v1/runs/{run}/stop): no round advances, devices leave.
    stopped = "stopped"


class LoraSpec(_Strict):
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
    )
    aggregation: Literal["factors", "ffa", "svd"] = Field(
        "factors", description="how the coordinator combines the devices' LoRA factors (ARCHITECTURE.md, "
        "\"LoRA aggregation\"). factors: the mean of A and the mean of B, each on its own (FedAvg; "
        "mean(B)·mean(A) is not the mean of the products B·A). ffa: A stays at its seeded init on every "
        "device and on the server and only B trains (FFA-LoRA), so the mean of B is the exact mean of the "
        "products; an update whose A changed is refused. svd: the server takes each module's weighted mean "
        "of B·A and re-factorises it to rank r by truncated SVD (needs aggregation.rule 'mean')")

    @model_serializer(mode="wrap")
    def _default_aggregation_unsaid(self, handler: SerializerFunctionWrapHandler):
        # The default goes unsaid, so a spec, a task or adapter_info.json that does not choose
        # a mode serialises byte for byte as before the choice existed, and devices whose
        # LoraSpec predates it still take such tasks. No return annotation: with one, pydantic
        # would describe the serialised LoraSpec by it instead of by the fields (OpenAPI).
        data = handler(self)
        if isinstance(data, dict) and data.get("aggregation") == "factors":
            del data["aggregation"]
        return data


class TrainSpec(_Strict):
    """Local training on a device's private data, per round."""

    epochs: float = Field(1.0, gt=0)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    max_len: int = Field(
        512, ge=8, le=32_768, description="tokens per training sequence (prompt, chat template and reply); "
        "longer records are cut at the end, counted as truncated_records in the training report")
    max_steps: int | None = Field(None, ge=1)
    # Opt-in speedups and memory savings (common/ml/train_options.py); the defaults train exactly as before.
    bucket_window: int | None = Field(
        None, ge=1, description="length bucketing: batches pooled this many at a time and sorted by length "
        "(less padding); the same examples in batches of the same sizes")
    optimizer: Literal["default", "foreach", "fused"] = Field(
        "default", description="AdamW implementation: torch's per-tensor loop (default), multi-tensor, or fused")
    labelled_logits: bool = Field(
        False, description="run the output head only where the next token is trained (the reply); for a "
        "large vocabulary most of the forward pass and of its memory")
    loss_chunk: int | None = Field(
        None, ge=1, description="head + loss over this many positions at a time, recomputed in backward "
        "(bounds the logits' memory; for Gemma's 262k-word vocabulary, 1 MiB per position)")
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer in backward instead of keeping its activations")

    @model_serializer(mode="wrap")
    def _default_options_unsaid(self, handler: SerializerFunctionWrapHandler):
        # Defaults go unsaid, so a spec or task that turns nothing on serialises as before.
        data = handler(self)
        if isinstance(data, dict):
            for name, default in (("bucket_window", None), ("optimizer", "default"), ("labelled_logits", False),
                                  ("loss_chunk", None), ("gradient_checkpointing", False)):
                if data.get(name, default) == default:
                    data.pop(name, None)
        return data


class DistillSpec(_Strict):
    """Server-side mutual distillation between the LLM and the aggregated SLM (FedCoLLM)."""

    epochs: float = Field(1.0, gt=0)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    lambda_kd: float = Field(0.5, ge=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)
    direction: Literal["mutual", "llm_to_slm"] = Field(
        "mutual", description="mutual: both sides learn from each other (FedCoLLM); llm_to_slm: the LLM stays "
        "frozen and only teaches the SLM (an ablation that isolates what the mutual direction adds)")
    labelled_logits: bool = Field(
        False, description="run each model's output head only where the next token is trained (the reply); "
        "the loss is unchanged, and for a large vocabulary most of the forward pass is saved")

    @model_serializer(mode="wrap")
    def _default_option_unsaid(self, handler: SerializerFunctionWrapHandler):
        # The default goes unsaid, so a spec that does not turn it on serialises as before.
        data = handler(self)
        if isinstance(data, dict) and not data.get("labelled_logits", False):
            data.pop("labelled_logits", None)
        return data


class PrivacySpec(_Strict):
    """Local differential privacy: each device clips its update's change to `clip_norm` (L2)
    and adds Gaussian noise of std `noise_multiplier * clip_norm` before uploading."""

    clip_norm: float = Field(1.0, gt=0)
    noise_multiplier: float = Field(0.0, ge=0, description="0 clips without noise (no DP guarantee)")
    delta: float = Field(1e-5, gt=0, lt=1)


class AggregationRule(str, Enum):
    """How a round's updates become one (ARCHITECTURE.md, "Round state machine")."""

    mean = "mean"  # sample-weighted mean (FedAvg)
    median = "median"  # coordinate-wise median, one vote per update
    trimmed_mean = "trimmed_mean"  # coordinate-wise mean after dropping the extremes, one vote per update


class AggregationSpec(_Strict):
    """How the coordinator aggregates a round's updates. The defaults are FedAvg's weighted mean."""

    rule: AggregationRule = AggregationRule.mean
    trim_fraction: float | None = Field(
        None, ge=0, lt=0.5, description="trimmed_mean: the fraction of updates dropped at each end of every "
        "coordinate (rounded down to whole updates); default 0.2")
    norm_bound: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="clip each update's change from the round's starting "
        "adapter to this L2 norm (over all its tensors) before aggregating; None: no bound")
    max_weight_share: float | None = Field(
        None, gt=0, le=1, description="mean: no update carries more than this share of the round's total weight "
        "(larger weights are lowered until it holds); None: no cap beyond max_samples_per_update")

    @field_validator("trim_fraction")
    @classmethod
    def _trim_needs_trimmed_mean(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("rule") != AggregationRule.trimmed_mean:
            raise ValueError("trim_fraction applies only to rule 'trimmed_mean'")
        return value

    @field_validator("max_weight_share")
    @classmethod
    def _share_needs_mean(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("rule") != AggregationRule.mean:
            raise ValueError("median and trimmed_mean give every update one vote; max_weight_share applies "
                             "only to rule 'mean'")
        return value

    @property
    def trim(self) -> float:
        return 0.2 if self.trim_fraction is None else self.trim_fraction


class SecureAggregationSpec(_Strict):
    """Secure aggregation in the SecAgg+ family (ARCHITECTURE.md, "Secure aggregation"): the
    coordinator learns only the weighted sum of the round's updates."""

    neighbours: int | None = Field(
        None, ge=2, le=256, description="how many neighbours each device shares its secrets with and masks "
        "against (even); None: about 2 log2 n, SecAgg+'s O(log n)")
    threshold_fraction: float = Field(
        0.5, ge=0.5, lt=1.0, description="a device's secrets need more than this fraction of its neighbours' "
        "shares to be rebuilt: the most neighbours that may drop, and the fewest that must collude")
    clip: float = Field(
        4.0, gt=0, le=1e6, allow_inf_nan=False,
        description="update values are clipped to [-clip, clip] before fixed-point quantisation")
    phase_deadline_s: float = Field(
        60.0, gt=0, description="how long the key, share and unmask phases wait for every device before going "
        "on without the missing ones (training keeps round_deadline_s)")

    @field_validator("neighbours")
    @classmethod
    def _even(cls, value: int | None) -> int | None:
        if value is not None and value % 2:
            raise ValueError("neighbours must be even (each device joins the same number on either side of a ring)")
        return value


class SecureAggregationTask(BaseModel):
    """What a device needs to take part in a round under secure aggregation."""

    clip: float
    fraction_bits: int = Field(description="the fixed-point scale: values are multiplied by 2^fraction_bits")
    weight_cap: int = Field(description="the largest aggregation weight (sample count) an update may carry")
    threshold_fraction: float


class RunSpec(_Strict):
    """What an admin asks for with `POST /v1/runs`. Paths are on the coordinator's disk."""

    name: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    algorithm: str = Field("fedcollm", description="fedavg | fedcollm | co-plms | crosslm")
    slm: str = Field(..., description="HF checkpoint directory of the shared SLM (with tokenizer)")
    llm: str | None = Field(None, description="HF checkpoint directory of the LLM (fedcollm)")
    rounds: int = Field(3, ge=1, le=100_000)
    min_clients: int = Field(2, ge=1, description="quorum: updates needed to close a round")
    max_devices: int = Field(
        1000, ge=1, le=1_000_000,
        description="the most devices enrolled at once (revoked ones do not count); enrolling past it "
        "answers 409 run_full, so one enroll token cannot admit unlimited devices",
    )
    round_deadline_s: float = Field(
        600.0, gt=0, description="after this, a round closes as soon as it has its quorum"
    )
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    aux_data: str | None = Field(None, description="JSONL public auxiliary data (server side)")
    eval_data: str | None = Field(None, description="JSONL held-out data the server scores on")
    eval_max_new_tokens: int = Field(
        256, ge=1, le=4096, description="generation budget of the server's evaluation (and pseudo-labels); "
        "answers it cuts are counted as truncated_answers")
    privacy: PrivacySpec | None = Field(None, description="local DP on every device update")
    builds: list[str] = Field(
        default_factory=list, max_length=16,
        description='edge builds of the SLM to publish after the last round, e.g. ["gguf:q8_0", "onnx:int8"]',
    )
    seed: int = 0
    max_samples_per_update: int = Field(
        1_000_000, ge=1, le=1_000_000_000,
        description="the most samples one update may declare (cotune.num_samples): uploads above it are "
        "refused, and no update weighs more than this in aggregation",
    )
    aggregation: AggregationSpec = Field(
        default_factory=AggregationSpec, description="how each round's updates are aggregated")
    secure_aggregation: SecureAggregationSpec | None = Field(
        None, description="true (or settings): devices upload masked updates and the coordinator learns only "
        "their weighted sum (SecAgg+); refused with rules or checks that need each update on its own")
    update_encoding: Literal["fp32", "fp16", "int8-tensor", "int8-row"] = Field(
        "fp32", description="how updates travel (common/encoding.py): fp32 as trained; fp16, or int8 with one "
        "scale per tensor or per row, of the change from the round's start (2 or about 1 byte per value)")
    enroll_token: str | None = Field(
        None, min_length=16, description="token devices enroll with; generated when absent"
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="settings of the chosen algorithm beyond the shared ones; co-plms and crosslm validate "
        "them into their own typed models (unknown keys are refused there)",
    )

    @field_validator("algorithm")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()

    @field_validator("secure_aggregation", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        # `secure_aggregation: true` takes the default settings; false is the same as leaving it out.
        if isinstance(value, bool):
            return {} if value else None
        return value


class RunCreated(BaseModel):
    run_id: str
    name: str
    enroll_token: str
    created: bool = Field(description="false when a run of that name and spec already existed")


class DeviceProfile(_Strict):
    arch: str = Field("unknown", max_length=64)
    os: str = Field("unknown", max_length=64)
    cores: int = Field(1, ge=1, le=4096)
    ram_bytes: int = Field(0, ge=0)
    accelerator: str | None = Field(None, max_length=128)
    backends: list[str] = Field(default_factory=list, max_length=16)


class SlmInfo(_Strict):
    """The SLM a device brings itself (structure-agnostic methods such as Co-PLMs)."""

    arch: str = Field(..., max_length=64, description="model_type, e.g. llama, qwen2, gpt2")
    num_parameters: int = Field(0, ge=0)
    vocab_size: int = Field(0, ge=0)
    tokenizer_sha256: str | None = Field(None, pattern=SHA256_PATTERN)


class ClientRegistration(_Strict):
    name: str = Field("device", min_length=1, max_length=128)
    profile: DeviceProfile = Field(default_factory=DeviceProfile)
    task_kinds: list[str] = Field(
        default_factory=lambda: ["lora_sft"], max_length=32,
        description="the kinds of round task this device can run",
    )
    slm: SlmInfo | None = Field(None, description="the device's own SLM, when it brings one")


class ClientCredentials(BaseModel):
    client_id: str
    run_id: str
    token: str = Field(description="bearer token for this client; shown once, stored hashed")


class ArtifactRef(BaseModel):
    name: str
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=0)


class ClientTask(BaseModel):
    """What a device does in a round. `kind` picks the device-side handler; `params`
    carries what a kind needs beyond the LoRA and training settings."""

    kind: str = "lora_sft"
    lora: LoraSpec
    train: TrainSpec
    seed: int
    params: dict[str, Any] = Field(default_factory=dict)
    privacy: PrivacySpec | None = None
    secure_aggregation: SecureAggregationTask | None = None
    update_encoding: str = Field("fp32", description="common/encoding.py: how the device encodes its upload")
    update_base: str | None = Field(
        None, description="the artifact whose tensors an encoded upload is the change from; none: from zero")
    builds: list[str] = Field(
        default_factory=list, max_length=16,
        description="edge builds the device makes of its own final model when the run ends, e.g. "
        '["gguf:q8_0"] (methods whose device SLM never leaves the device); empty: none, or pulled from the run',
    )


class RoundInfo(BaseModel):
    run_id: str
    run_state: RunState
    rounds_total: int
    round: int = Field(description="1-based; the last round once the run has finished")
    state: RoundState
    deadline: datetime | None = None
    artifacts: list[ArtifactRef]
    task: ClientTask
    submitted: bool = Field(description="whether this client's update for the round is in")
    builds: str = Field("none", description="edge builds of the final model: none | pending | ready | failed")


class UpdateReceipt(BaseModel):
    run_id: str
    round: int
    client_id: str
    sha256: str
    num_samples: int
    duplicate: bool = Field(description="true when this exact update had been accepted before")


class RoundSummary(BaseModel):
    round: int
    state: RoundState
    num_updates: int
    num_samples: int
    opened_at: datetime | None = None
    collecting_at: datetime | None = None
    deadline: datetime | None = None
    closed_at: datetime | None = None
    phase_times: dict[str, datetime] = Field(
        default_factory=dict, description="when the round entered each state it went through (a timeline)")
    metrics: dict[str, Any] = Field(default_factory=dict)
    artifacts: list[ArtifactRef] = Field(default_factory=list)


class DeviceInfo(BaseModel):
    """A device of a run as the admin sees it (GET /v1/runs/{run}/clients)."""

    client_id: str
    name: str
    profile: dict[str, Any] = Field(default_factory=dict)
    enrolled_at: datetime
    last_seen: datetime | None = Field(None, description="last call to the coordinator (to within 30 s)")
    updates_sent: int = Field(0, ge=0)
    revoked: bool = False


class RunStatus(BaseModel):
    run_id: str
    name: str
    algorithm: str
    state: RunState
    rounds_total: int
    current_round: int
    num_clients: int
    error: str | None = None
    rounds: list[RoundSummary] = Field(default_factory=list)
    spec: dict[str, Any] | None = Field(None, description="the run's spec; the admin's view only")


class GenerateRequest(_Strict):
    """`POST /v1/generate`: a device escalates a prompt to the coordinator's LLM."""

    prompt: str = Field(..., min_length=1, max_length=32_000)
    max_tokens: int = Field(64, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=8)


class GenerateResponse(BaseModel):
    text: str
    tokens: int = Field(description="tokens generated")
    model: str = Field(description="which model answered, with the round of its adapter")
    seconds: float


class BuildInfo(BaseModel):
    """One edge build of a run's SLM: its manifest, and the files to download by digest."""

    name: str = Field(description="e.g. gguf-q8_0, onnx-int8")
    round: int
    manifest: dict[str, Any] = Field(description="the build's manifest.json (common.manifest.BuildManifest)")
    files: list[ArtifactRef]


class BuildList(BaseModel):
    best: BuildInfo | None = Field(None, description="the build that fits the given device profile best")
    reason: str | None = Field(None, description="why no build fits, when none does")
    builds: list[BuildInfo]


class DeviceBuildReport(_Strict):
    """A build a device made of its own SLM (methods whose device SLM never leaves the device:
    Co-PLMs, CrossLM). Only the manifest travels: names, sizes, digests and parity figures."""

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                      description="e.g. gguf-q8_0")
    manifest: dict[str, Any] = Field(description="the build's manifest.json (common.manifest.BuildManifest)")


class BuildRequest(_Strict):
    targets: list[str] = Field(..., min_length=1, max_length=16, description='e.g. ["gguf:q8_0", "onnx:int8"]')


class ErrorDetail(BaseModel):
    """Every 4xx/5xx carries this as `detail`: what went wrong, and what to do."""

    code: str
    message: str
    hint: str | None = None
