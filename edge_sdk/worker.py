"""A device taking part in a run: enroll once, then per round pull the adapter, train it on
local data, upload it; at the end keep the final adapter. Private data never leaves here.

The device keeps its credentials and any trained-but-unsent update under `state_dir`, so a
device that restarts resumes as the same client and re-sends the same bytes (which the
coordinator accepts once) instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.private_file import write_private
from common.protocol import (
    META_KIND,
    META_METRICS,
    META_NUM_SAMPLES,
    ArtifactRef,
    ClientCredentials,
    ClientRegistration,
    RoundInfo,
    RoundState,
    RunState,
)
from common.secagg.ring import layout_of
from common.tensorfile import save_arrays
from edge_sdk.client import CoordinatorClient, CoordinatorError
from edge_sdk.doctor import check_install
from edge_sdk.handlers import DeviceContext, FinalArtifacts, TaskHandler, UpdatePayload, handler_for, task_kinds
from edge_sdk.paths import check_name, safe_join
from edge_sdk.profile import detect_profile
from edge_sdk.update_encoding import encode_payload

log = logging.getLogger("cotune.edge")

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
    local_slm: Path | None = None
    ca_cert: Path | None = None
    build_wait_s: float = 600.0
    device: str = "cpu"  # where local training runs (DeviceSettings.device; the CLI passes auto)


@dataclass
class JoinResult:
    run_id: str
    client_id: str
    rounds_trained: list[int] = field(default_factory=list)
    final_adapter: Path | None = None
    final_adapter_sha256: str | None = None
    model_dir: Path | None = None
    build_dir: Path | None = None
    # True when the run's operator stopped the run: the device left with no final model.
    stopped: bool = False


def encode_update(payload: UpdatePayload, kind: str | None = None) -> bytes:
    """An update body as the coordinator takes it: the tensors, with the sample count, the
    device's metrics (JSON) and the task kind in the safetensors metadata."""
    metadata = {META_NUM_SAMPLES: str(payload.num_samples), META_METRICS: json.dumps(payload.metrics)}
    if kind is not None:
        metadata[META_KIND] = kind
    return save_arrays(payload.arrays, metadata)


def place(blob: Path, dest: Path) -> None:
    """Put a cached blob at `dest` (a checked path): a hard link, or a copy where links cannot go.
    Whatever was at `dest`, a symlink included, is removed first, never written through."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    try:
        os.link(blob, dest)
    except OSError:
        shutil.copyfile(blob, dest)


class ArtifactCache:
    """Downloads kept by digest, so a base model is fetched once per device, not per round."""

    def __init__(self, root: Path, client: CoordinatorClient) -> None:
        self.root = Path(root)
        self.client = client

    @property
    def source(self) -> str:
        """Who names the artifacts (the coordinator's URL), for messages."""
        return getattr(self.client, "base_url", "(in process)")

    def fetch(self, ref: ArtifactRef) -> Path:
        # ArtifactRef admits only a lowercase hex sha256, so the digest is a safe file name.
        path = self.root / "blobs" / ref.sha256
        if not path.exists():
            self.client.download(ref, path)
        return path

    def materialize(self, refs: list[ArtifactRef], prefix: str, target: Path) -> Path:
        """Lay out `prefix/<file>` artifacts as a model directory (hard links, no copies).

        Every name is checked to stay inside `target` before anything is fetched or written
        (UnsafePathError naming the artifact and the coordinator otherwise)."""
        target.mkdir(parents=True, exist_ok=True)
        chosen = [ref for ref in refs if ref.name.startswith(prefix + "/")]
        dests = [safe_join(target, ref.name[len(prefix) + 1 :], what="artifact", source=self.source,
                           full_name=ref.name) for ref in chosen]
        for ref, dest in zip(chosen, dests, strict=True):
            place(self.fetch(ref), dest)
        return target


class EdgeWorker:
    def __init__(self, config: JoinConfig, on_event: Callable[[str], None] | None = None) -> None:
        from common.records import read_jsonl

        self.config = config
        self.say = on_event or (lambda msg: log.info("%s", msg))
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Read (and so check) the private data before talking to anyone.
        records = read_jsonl(Path(config.data))
        eval_records = read_jsonl(Path(config.eval_data)) if config.eval_data else []
        self.client = CoordinatorClient(config.coordinator,
                                        verify=str(config.ca_cert) if config.ca_cert else True)
        self.ctx = DeviceContext(records=records, eval_records=eval_records,
                                 cache=ArtifactCache(self.state_dir / "cache", self.client),
                                 state_dir=self.state_dir, say=self.say, progress=config.progress,
                                 local_slm=config.local_slm, coordinator=config.coordinator,
                                 device=config.device)
        self._handlers: dict[str, TaskHandler] = {}
        self._rng = random.Random()

    def handler(self, kind: str) -> TaskHandler:
        if kind not in self._handlers:
            self._handlers[kind] = handler_for(kind)(self.ctx)
        return self._handlers[kind]

    # -- enrollment ----------------------------------------------------------------------

    def registration(self) -> ClientRegistration:
        slm = None
        if self.config.local_slm is not None:
            from common.checkpoint import describe_local_slm

            slm = describe_local_slm(self.config.local_slm)
        return ClientRegistration(name=self.config.name, profile=detect_profile(),
                                  task_kinds=task_kinds(), slm=slm)

    def _credentials(self) -> ClientCredentials:
        path = self.state_dir / "credentials.json"
        # Which enroll token the credentials came from (its digest): another token means another
        # run, which these credentials cannot join.
        token_digest = hashlib.sha256(self.config.enroll_token.encode()).hexdigest()
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("coordinator") == self.config.coordinator:
                creds = ClientCredentials.model_validate(saved["credentials"])
                self._check_ids(creds)
                if saved.get("enroll_token_sha256", token_digest) != token_digest:
                    raise RuntimeError(
                        f"the state directory {self.state_dir} holds this device's enrollment in run {creds.run_id} "
                        "of this coordinator, made with another enroll token; a state directory takes part in one "
                        "run: to join another, give another --state-dir (or move this one aside)")
                self.client.token = creds.token
                return creds
        creds = self.client.register(self.config.enroll_token, self.registration())
        self._check_ids(creds)  # before they are kept: they name files in the state dir
        write_private(path, json.dumps({"coordinator": self.config.coordinator, "enroll_token_sha256": token_digest,
                                        "credentials": creds.model_dump()}))
        self.say(f"enrolled as client {creds.client_id} in run {creds.run_id}")
        return creds

    def _check_ids(self, creds: ClientCredentials) -> None:
        check_name(creds.run_id, what="run id", source=self.config.coordinator)
        check_name(creds.client_id, what="client id", source=self.config.coordinator)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> JoinResult:
        # Before enrolling: every device task kind trains, and a device that enrolls and then
        # fails at its first round holds a place in the run for nothing.
        check_install(train=True)
        creds = self._credentials()
        result = JoinResult(run_id=creds.run_id, client_id=creds.client_id)
        waiting_logged: int | None = None
        while True:
            info = self.client.current_round(creds.run_id)
            if info.run_id != creds.run_id:
                raise RuntimeError(f"the coordinator at {self.config.coordinator} answered for run "
                                   f"{info.run_id[:64]!r}, not this device's run {creds.run_id!r}; refusing "
                                   "it: the coordinator is broken or hostile, or the URL is wrong")
            if info.run_state == RunState.finished:
                return self._finish(info, result)
            if info.run_state == RunState.failed:
                status = self.client.run_status(creds.run_id)
                raise RuntimeError(f"the run failed on the coordinator: {status.error}")
            if info.run_state == RunState.stopped:
                self.say(f"the run was stopped by its operator in round {info.round}/{info.rounds_total}; "
                         "leaving it (there is no final model)")
                result.stopped = True
                self.client.close()
                return result
            if info.task.builds:  # known only once enrolled; still before any training
                check_install(builds=True)
            if info.task.secure_aggregation is not None:
                if self._secure_step(creds, info, result):
                    continue
            elif info.state in _ACCEPTING and not info.submitted:
                if self._take_part(creds, info, self._encoder(info)):
                    result.rounds_trained.append(info.round)
                continue
            if waiting_logged != info.round:
                self.say(f"round {info.round}/{info.rounds_total}: {info.state.value}, waiting")
                waiting_logged = info.round
            time.sleep(self.config.poll_s * self._rng.uniform(0.8, 1.2))

    def _secure_step(self, creds: ClientCredentials, info: RoundInfo, result: JoinResult) -> bool:
        """One step of a secure-aggregation round (edge_sdk/secagg.py); True if anything was sent.
        A device that missed a phase sits the round out: the coordinator no longer counts it."""
        try:
            from edge_sdk.secagg import check_secagg_install

            check_secagg_install()
        except ImportError as exc:
            raise RuntimeError(f"this run uses secure aggregation, which this install cannot do ({exc}); install "
                               "it with: pip install 'cotune[secagg]'") from None
        from edge_sdk.secagg import SecureSession

        marks = self.state_dir / f"secagg-{creds.run_id}-{info.round}.progress"
        done = set(marks.read_text().split()) if marks.exists() else set()
        if "out" in done:
            return False

        def mark(step: str) -> None:
            marks.write_text(" ".join(sorted(done | {step})))

        for old in self.state_dir.glob(f"secagg-{creds.run_id}-*"):  # finished rounds' secrets go
            if not old.name.startswith(f"secagg-{creds.run_id}-{info.round}."):
                old.unlink(missing_ok=True)
        session = SecureSession(self.state_dir / f"secagg-{creds.run_id}-{info.round}.json", creds.run_id,
                                info.round, creds.client_id, info.task.secure_aggregation)
        run_id, number, me = creds.run_id, info.round, creds.client_id
        try:
            if info.state == RoundState.keys and "keys" not in done:
                self.client.advertise_keys(run_id, number, me, session.advert())
                mark("keys")
                return True
            if info.state == RoundState.shares and "shares" not in done:
                self.client.deal_shares(run_id, number, me, session.deal(self.client.neighbourhood(run_id, number)))
                mark("shares")
                return True
            if info.state == RoundState.collecting and not info.submitted and "shares" in done:
                inbox = self.client.inbox(run_id, number)

                def masked(payload: UpdatePayload) -> UpdatePayload:
                    layout = layout_of({k: (np.shape(v), "") for k, v in payload.arrays.items()})
                    arrays, clipped = session.masked(payload.arrays, layout, payload.num_samples, inbox)
                    if clipped:
                        self.say(f"round {number}: {clipped} update values were clipped to the run's range "
                                 f"[-{info.task.secure_aggregation.clip}, {info.task.secure_aggregation.clip}]")
                    return UpdatePayload(arrays=arrays, num_samples=payload.num_samples, metrics=payload.metrics)

                if self._take_part(creds, info, masked):
                    result.rounds_trained.append(number)
                return True
            if info.state == RoundState.unmasking and info.submitted and "reveal" not in done:
                self.client.reveal(run_id, number, me, session.reveal(self.client.unmask_request(run_id, number)))
                mark("reveal")
                return True
        except CoordinatorError as exc:
            if exc.code not in ("secagg_not_in_round", "secagg_wrong_phase", "round_closed"):
                raise
            self.say(f"round {number}: sitting this round out ({exc.message})")
            mark("out")
        return False

    def _encoder(self, info: RoundInfo) -> Callable[[UpdatePayload], UpdatePayload] | None:
        """The run's update encoding (common/encoding.py) as a step after the handler; None for fp32."""
        if info.task.update_encoding == "fp32":
            return None
        return lambda payload: encode_payload(payload, info, self.ctx.cache)

    def _take_part(self, creds: ClientCredentials, info: RoundInfo,
                   transform: Callable[[UpdatePayload], UpdatePayload] | None = None) -> bool:
        pending = self.state_dir / f"pending-{creds.run_id}-{info.round}.safetensors"
        if not pending.exists():
            payload = self.handler(info.task.kind).run(info)
            if transform is not None:
                payload = transform(payload)
            tmp = pending.with_suffix(".tmp")
            tmp.write_bytes(encode_update(payload, info.task.kind))
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

    def _pull_build(self, info: RoundInfo, out_dir: Path) -> Path | None:
        """Fetch the edge build of the final model that fits this device, if the run makes any."""
        from common.manifest import BuildManifest

        deadline = time.monotonic() + self.config.build_wait_s
        while info.builds == "pending" and time.monotonic() < deadline:
            time.sleep(self.config.poll_s)
            info = self.client.current_round(info.run_id)
        if info.builds != "ready":
            if info.builds != "none":
                self.say(f"no edge build to pull (builds {info.builds}); the final adapter is kept as is")
            return None
        listing = self.client.builds(info.run_id, detect_profile())
        if listing.best is None:
            self.say(f"no edge build fits this device: {listing.reason}")
            return None
        build = listing.best
        manifest = BuildManifest.model_validate(build.manifest)
        # Every name is checked before anything is fetched or written.
        source = self.config.coordinator
        (out_dir / "build").mkdir(parents=True, exist_ok=True)
        target = safe_join(out_dir / "build", build.name, what="build name", source=source, nested=False)
        target.mkdir(exist_ok=True)
        dests = [safe_join(target, ref.name, what=f"file of build {build.name!r}", source=source)
                 for ref in build.files]
        for name in (manifest.model_file, manifest.tokenizer_file):
            if name is not None:
                safe_join(target, name, what=f"manifest file of build {build.name!r}", source=source)
        for ref, dest in zip(build.files, dests, strict=True):
            place(self.ctx.cache.fetch(ref), dest)
        manifest.write(target)
        self.say(f"pulled edge build {build.name} ({sum(f.size for f in build.files) / 2**20:.1f} MiB) into {target}")
        return target

    def _make_builds(self, info: RoundInfo, final: FinalArtifacts, out_dir: Path) -> Path | None:
        """Export this device's final SLM to the run's build targets and report each build."""
        from edge_sdk.builds import make_device_builds

        self.say(f"making edge builds {', '.join(info.task.builds)} of this device's final model")
        return make_device_builds(final, info.task.lora, info.task.builds, out_dir, run_id=info.run_id,
                                  round=info.round, say=self.say, profile=detect_profile(),
                                  report=lambda report: self.client.report_build(info.run_id, report),
                                  progress=self.config.progress)

    def _finish(self, info: RoundInfo, result: JoinResult) -> JoinResult:
        out_dir = Path(self.config.out_dir or self.state_dir / "final")
        out_dir.mkdir(parents=True, exist_ok=True)
        final = self.handler(info.task.kind).finish(info, out_dir)
        result.final_adapter = final.adapter
        result.final_adapter_sha256 = final.adapter_sha256
        result.model_dir = final.model_dir
        if info.task.builds:  # the method's SLM lives here, so its builds are made here
            result.build_dir = self._make_builds(info, final, out_dir)
        else:
            result.build_dir = self._pull_build(info, out_dir)
        (out_dir / "final.json").write_text(json.dumps({
            "run_id": result.run_id, "client_id": result.client_id, "round": info.round,
            "adapter_sha256": final.adapter_sha256, "rounds_trained": result.rounds_trained,
            "model_dir": str(final.model_dir), "artifacts": [r.model_dump() for r in info.artifacts],
            "peft_dir": str(final.peft_dir) if final.peft_dir else None,
            "build_dir": str(result.build_dir) if result.build_dir else None,
        }, indent=2))
        self.say(f"run finished after round {info.round}; final adapter sha256 {final.adapter_sha256[:12]} "
                 f"in {final.model_dir}")
        self.client.close()
        return result
