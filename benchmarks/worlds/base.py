"""What a quality-benchmark world provides (synthetic and real tracks alike)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AUX_MODES = ("paper", "prompts", "public-only")
N_DEVICES = 4


@dataclass
class World:
    track: str  # "synthetic" | "real"
    root: Path
    llm_dir: Path  # the server's LLM checkpoint (HF dir, project checkpoint format)
    slm_dir: Path  # the shared SLM of the homogeneous methods; same tokenizer as the LLM
    het_slms: list[Path]  # per device: its own SLM in the heterogeneous methods (one per device);
    #                       at least one has a tokenizer different from the LLM's
    devices: list[Path]  # per device: private training JSONL (TaskRecord lines)
    aux: dict[str, Path]  # aux mode (AUX_MODES) -> server auxiliary JSONL; "prompts" has empty responses
    validation: Path  # JSONL, every domain; used for settings search and per-round curves
    test: Path  # JSONL, every domain, read once per reported run
    general: Path  # JSONL of general held-out text (prompt "" and response = the text) for LLM perplexity
    prompt_pool: Path  # JSONL of in-domain prompts (responses empty) CrossLM may use
    instructions: Path | None = None  # JSONL of per-domain instruction prefixes (CrossLM's "samples" synthesis)
    # test prompt -> tags describing what knowledge the item needs, e.g.
    # {"word": "device" | "llm-only" | "nowhere" | "both", "kind": "fact" | "rule"}; free-form keys,
    # each key becomes a breakdown in the report
    test_tags: dict[str, dict[str, str]] = field(default_factory=dict)
    device_domains: list[dict[str, int]] = field(default_factory=list)  # per device: records per domain
    truth: dict[str, str] = field(default_factory=dict)  # prompt_pool prompt -> reference answer (oracle only)
    max_new_tokens: int = 24  # evaluation generation budget that fits every reference answer
    stats: dict[str, Any] = field(default_factory=dict)
