"""A device taking part in a run: enroll once, then per round pull the adapter, train it on
local data, upload it; at the end keep the final adapter. Private data never leaves here.

The device keeps its credentials and any trained-but-unsent update under `state_dir`, so a
device that restarts resumes as the same client and re-sends the same bytes (which the
coordinator accepts once) instead of training again.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.client import CoordinatorClient, CoordinatorError
from edge_sdk.profile import detect_profile
from edge_sdk.protocol import (
    META_METRICS,
    META_NUM_SAMPLES,
    ArtifactRef,
    ClientCredentials,
    RoundInfo,
    RoundState,
    RunState,
)

log = logging.getLogger("cotune.edge")

ADAPTER_NAME = "slm/adapter.safetensors"
_ACCEPTING = (RoundState.open, RoundState.collecting)


@dataclass
class JoinConfig:
    coordinator: str
    enroll_token: str
    data: Path
    state_dir: Path
    name: str = "device"
    eval_data: Path | None = None
    poll_s: float = 1.0
    out_dir: Path | None = None
    progress: bool = True


@dataclass
class JoinResult:
    run_id: str
    client_id: str
    rounds_trained: list[int] = field(default_factory=list)
    final_adapter: Path | None = None
    final_adapter_sha256: str | None = None
    model_dir: Path | None = None


class ArtifactCache:
    """Downloads kept by digest, so a base model is fetched once per device, not per round."""

    def __init__(self, root: Path, client: CoordinatorClient) -> None:
        self.root = Path(root)
        self.client = client

    def fetch(self, ref: ArtifactRef) -> Path:
        path = self.root / "blobs" / ref.sha256
        if not path.exists():
            self.client.download(ref, path)
        return path

    def materialize(self, refs: list[ArtifactRef], prefix: str, target: Path) -> Path:
        """Lay out `prefix/<file>` artifacts as a model directory (hard links, no copies)."""
        target.mkdir(parents=True, exist_ok=True)
        for ref in refs:
            if not ref.name.startswith(prefix + "/"):
                continue
            blob = self.fetch(ref)
            dest = target / ref.name[len(prefix) + 1 :]
            if dest.exists():
                dest.unlink()
            try:
                os.link(blob, dest)
            except OSError:
                shutil.copyfile(blob, dest)
        return target


class EdgeWorker:
    def __init__(self, config: JoinConfig, on_event: Callable[[str], None] | None = None) -> None:
        from edge_sdk.tasks.records import read_jsonl

        self.config = config
        self.say = on_event or (lambda msg: log.info("%s", msg))
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Read (and so check) the private data before talking to anyone.
        self.records = read_jsonl(Path(config.data))
        self.eval_records = read_jsonl(Path(config.eval_data)) if config.eval_data else []
        self.client = CoordinatorClient(config.coordinator)
        self.cache = ArtifactCache(self.state_dir / "cache", self.client)
        self._model: Any = None
        self._model_key: tuple[str, ...] | None = None
        self._rng = random.Random()

    # -- enrollment ----------------------------------------------------------------------

    def _credentials(self) -> ClientCredentials:
        path = self.state_dir / "credentials.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("coordinator") == self.config.coordinator:
                creds = ClientCredentials.model_validate(saved["credentials"])
                self.client.token = creds.token
                return creds
        creds = self.client.register(self.config.enroll_token, self.config.name, detect_profile())
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"coordinator": self.config.coordinator,
                                   "credentials": creds.model_dump()}))
        tmp.chmod(0o600)
        os.replace(tmp, path)
        self.say(f"enrolled as client {creds.client_id} in run {creds.run_id}")
        return creds

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> JoinResult:
        creds = self._credentials()
        result = JoinResult(run_id=creds.run_id, client_id=creds.client_id)
        waiting_logged: int | None = None
        while True:
            info = self.client.current_round(creds.run_id)
            if info.run_state == RunState.finished:
                return self._finish(info, result)
            if info.run_state == RunState.failed:
                status = self.client.run_status(creds.run_id)
                raise RuntimeError(f"the run failed on the coordinator: {status.error}")
            if info.state in _ACCEPTING and not info.submitted:
                if self._take_part(creds, info):
                    result.rounds_trained.append(info.round)
                continue
            if waiting_logged != info.round:
                self.say(f"round {info.round}/{info.rounds_total}: {info.state.value}, waiting")
                waiting_logged = info.round
            time.sleep(self.config.poll_s * self._rng.uniform(0.8, 1.2))

    def _take_part(self, creds: ClientCredentials, info: RoundInfo) -> bool:
        pending = self.state_dir / f"pending-{creds.run_id}-{info.round}.safetensors"
        if not pending.exists():
            body = self._train(info)
            tmp = pending.with_suffix(".tmp")
            tmp.write_bytes(body)
            os.replace(tmp, pending)
        try:
            receipt = self.client.upload_update(creds.run_id, info.round, creds.client_id, pending.read_bytes())
        except CoordinatorError as exc:
            if exc.code in ("round_closed", "update_exists"):
                self.say(f"round {info.round}: update not taken ({exc.message}); going on")
                pending.unlink(missing_ok=True)
                return False
            raise
        pending.unlink(missing_ok=True)
        self.say(f"round {info.round}/{info.rounds_total}: update sent "
                 f"({receipt.num_samples} samples, sha256 {receipt.sha256[:12]})")
        return True

    def _load(self, info: RoundInfo) -> Any:
        """The SLM with the round's adapter; the base is loaded once and kept."""
        from edge_sdk.ml.lora import adapter_from_bytes, attach_lora, load_adapter_state
        from edge_sdk.ml.tiny import load_checkpoint

        base_refs = [r for r in info.artifacts if r.name.startswith("slm/") and r.name != ADAPTER_NAME]
        key = tuple(sorted(r.sha256 for r in base_refs)) + (info.task.lora.model_dump_json(),)
        if self._model_key != key:
            model_dir = self.cache.materialize(base_refs, "slm", self.state_dir / "model")
            model, tokenizer = load_checkpoint(model_dir)
            self._model = (attach_lora(model, info.task.lora, info.task.seed), tokenizer)
            self._model_key = key
        adapter_ref = next(r for r in info.artifacts if r.name == ADAPTER_NAME)
        tensors, _ = adapter_from_bytes(self.cache.fetch(adapter_ref).read_bytes())
        load_adapter_state(self._model[0], tensors)
        return self._model

    def _train(self, info: RoundInfo) -> bytes:
        from edge_sdk.ml.evaluate import evaluate
        from edge_sdk.ml.lora import adapter_state, adapter_to_bytes
        from edge_sdk.ml.train import train_lora

        self.say(f"round {info.round}/{info.rounds_total}: training on {len(self.records)} local records")
        model, tokenizer = self._load(info)
        metrics: dict[str, Any] = {}
        if self.eval_records:
            # How the model this round started from does on this device's held-out data.
            metrics["local_eval_before"] = evaluate(model, tokenizer, self.eval_records)
        report = train_lora(model, tokenizer, self.records, info.task.train, seed=info.task.seed,
                            progress=self.config.progress)
        metrics["train"] = report
        metadata = {META_NUM_SAMPLES: str(len(self.records)), META_METRICS: json.dumps(metrics)}
        return adapter_to_bytes(adapter_state(model), metadata)

    def _finish(self, info: RoundInfo, result: JoinResult) -> JoinResult:
        out_dir = Path(self.config.out_dir or self.state_dir / "final")
        model_dir = self.cache.materialize(info.artifacts, "slm", out_dir / "slm")
        adapter_ref = next(r for r in info.artifacts if r.name == ADAPTER_NAME)
        result.final_adapter = model_dir / "adapter.safetensors"
        result.final_adapter_sha256 = adapter_ref.sha256
        result.model_dir = model_dir
        (out_dir / "final.json").write_text(json.dumps({
            "run_id": result.run_id, "client_id": result.client_id, "round": info.round,
            "adapter_sha256": adapter_ref.sha256, "rounds_trained": result.rounds_trained,
            "artifacts": [r.model_dump() for r in info.artifacts],
        }, indent=2))
        self.say(f"run finished after round {info.round}; final adapter sha256 {adapter_ref.sha256[:12]} "
                 f"in {model_dir}")
        self.client.close()
        return result
