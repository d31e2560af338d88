"""HTTP client for the coordinator: timeouts, retries with backoff and jitter, and a
sha256 check of every download (resumed with Range after a dropped connection)."""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from common import __version__
from common.digest import file_sha256
from common.protocol import (
    ArtifactRef,
    BuildInfo,
    BuildList,
    ClientCredentials,
    ClientRegistration,
    DeviceBuildReport,
    DeviceInfo,
    DeviceProfile,
    RoundInfo,
    RoundSummary,
    RunCreated,
    RunSpec,
    RunStatus,
    UpdateReceipt,
)
from common.retry import Backoff, call_with_retry
from common.secagg.wire import Inbox, KeyAdvert, Neighbourhood, Reveal, ShareBundle, UnmaskRequest

log = logging.getLogger("cotune.edge.client")
M = TypeVar("M", bound=BaseModel)


class CoordinatorError(Exception):
    """The coordinator answered with an error: its code, message and hint."""

    def __init__(self, status: int, code: str, message: str, hint: str | None = None) -> None:
        self.status, self.code, self.message, self.hint = status, code, message, hint
        super().__init__(f"{message} ({hint})" if hint else message)


class IntegrityError(Exception):
    """Downloaded bytes do not match their digest."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, (httpx.TransportError, IntegrityError)):
        return True
    return isinstance(exc, CoordinatorError) and (exc.status >= 500 or exc.status == 429)


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, dict) and "code" in detail:
        raise CoordinatorError(response.status_code, detail["code"], detail.get("message", ""), detail.get("hint"))
    raise CoordinatorError(response.status_code, f"http_{response.status_code}", f"{detail or response.text[:200]}")


class CoordinatorClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 60.0,
        backoff: Backoff = Backoff(),
        on_retry: Callable[[int, BaseException, float], None] | None = None,
        verify: bool | str | Path = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.backoff = backoff
        self.on_retry = on_retry or self._log_retry
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=10.0),
            headers={"User-Agent": f"cotune-edge/{__version__}"},
            verify=_tls_context(verify),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _log_retry(attempt: int, exc: BaseException, wait: float) -> None:
        log.warning("coordinator call failed (%s); retry %d in %.1fs", exc, attempt, wait)

    def _headers(self, token: str | None = None) -> dict[str, str]:
        token = token or self.token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _call(self, method: str, path: str, model: type[M] | None = None, token: str | None = None,
              **kwargs: Any) -> Any:
        def once() -> Any:
            response = self._http.request(method, path, headers=self._headers(token), **kwargs)
            _raise_for(response)
            if model is None:
                return response.json() if response.content else None
            return model.model_validate_json(response.content)

        return call_with_retry(once, _retryable, self.backoff, self.on_retry)

    # -- devices -------------------------------------------------------------------------

    def register(self, enroll_token: str, registration: ClientRegistration | str,
                 profile: DeviceProfile | None = None) -> ClientCredentials:
        """Enroll a device; `registration` may be just a name (with an optional profile)."""
        reg = registration if isinstance(registration, ClientRegistration) else ClientRegistration(
            name=registration, profile=profile or DeviceProfile())
        creds = self._call("POST", "/v1/clients", ClientCredentials, token=enroll_token,
                           json=reg.model_dump(mode="json"))
        self.token = creds.token
        return creds

    def current_round(self, run_id: str) -> RoundInfo:
        return self._call("GET", f"/v1/runs/{run_id}/rounds/current", RoundInfo)

    def run_status(self, run_id: str) -> RunStatus:
        return self._call("GET", f"/v1/runs/{run_id}", RunStatus)

    def round_summary(self, run_id: str, number: int) -> RoundSummary:
        return self._call("GET", f"/v1/runs/{run_id}/rounds/{number}", RoundSummary)

    def builds(self, run_id: str, profile: DeviceProfile | None = None) -> BuildList:
        params: dict[str, Any] = {}
        if profile is not None:
            params = {"arch": profile.arch, "ram_bytes": profile.ram_bytes, "cores": profile.cores,
                      "backends": ",".join(profile.backends)}
        return self._call("GET", f"/v1/runs/{run_id}/builds", BuildList, params=params)

    def upload_update(self, run_id: str, number: int, client_id: str, body: bytes) -> UpdateReceipt:
        # Safe to retry: the coordinator accepts the same bytes once and answers the
        # duplicate with the original receipt.
        return self._call("PUT", f"/v1/runs/{run_id}/rounds/{number}/updates/{client_id}",
                          UpdateReceipt, content=body)

    # -- secure aggregation (each PUT is safe to retry: the same body is answered as a duplicate)

    def _secagg(self, run_id: str, number: int, what: str) -> str:
        return f"/v1/runs/{run_id}/rounds/{number}/secagg/{what}"

    def advertise_keys(self, run_id: str, number: int, client_id: str, advert: KeyAdvert) -> Any:
        return self._call("PUT", self._secagg(run_id, number, f"keys/{client_id}"), json=advert.model_dump(mode="json"))

    def neighbourhood(self, run_id: str, number: int) -> Neighbourhood:
        return self._call("GET", self._secagg(run_id, number, "neighbourhood"), Neighbourhood)

    def deal_shares(self, run_id: str, number: int, client_id: str, bundle: ShareBundle) -> Any:
        return self._call("PUT", self._secagg(run_id, number, f"shares/{client_id}"),
                          json=bundle.model_dump(mode="json"))

    def inbox(self, run_id: str, number: int) -> Inbox:
        return self._call("GET", self._secagg(run_id, number, "inbox"), Inbox)

    def unmask_request(self, run_id: str, number: int) -> UnmaskRequest:
        return self._call("GET", self._secagg(run_id, number, "unmask"), UnmaskRequest)

    def reveal(self, run_id: str, number: int, client_id: str, reveal: Reveal) -> Any:
        return self._call("PUT", self._secagg(run_id, number, f"reveals/{client_id}"),
                          json=reveal.model_dump(mode="json"))

    def report_build(self, run_id: str, report: DeviceBuildReport) -> Any:
        """Tell the coordinator of an edge build this device made of its own SLM (its manifest;
        the files stay here). Safe to retry: a build is known by its name and manifest."""
        return self._call("POST", f"/v1/runs/{run_id}/device-builds", json=report.model_dump(mode="json"))

    def download(self, ref: ArtifactRef, dest: Path) -> Path:
        """Fetch an artifact to `dest`, resuming a partial file, and check its sha256.

        A `.part` file that a crash left complete (all `ref.size` bytes, or all the coordinator
        holds: it answers a Range past the end with 416) is checked and finished without
        fetching it again; one whose digest is wrong is discarded and fetched anew. A body
        longer than `ref.size` is cut off: a coordinator cannot fill the device's disk.
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")

        def finish() -> Path | None:
            """Rename the part into place if its digest is right; else discard it."""
            if file_sha256(part) == ref.sha256:
                os.replace(part, dest)
                return dest
            part.unlink(missing_ok=True)
            return None

        def once() -> Path:
            have = part.stat().st_size if part.exists() else 0
            if have > ref.size:
                part.unlink()
                have = 0
            if have and have == ref.size:  # the last byte came, the rename did not
                if finish() is not None:
                    return dest
                have = 0
            headers = self._headers()
            if have:
                headers["Range"] = f"bytes={have}-"
            with self._http.stream("GET", f"/v1/artifacts/{ref.sha256}", headers=headers) as response:
                if response.status_code == 416 and have:
                    # Nothing past what the part holds: it is the whole blob, or it is wrong.
                    response.read()
                    if finish() is not None:
                        return dest
                    raise IntegrityError(f"{ref.name}: the partial download did not match its sha256 and was "
                                         "discarded; fetching it anew")
                if not response.is_success:
                    response.read()
                    _raise_for(response)
                mode = "ab" if have and response.status_code == 206 else "wb"
                written = have if mode == "ab" else 0
                with part.open(mode) as fh:
                    for chunk in response.iter_bytes():  # as it arrives: a cut keeps what came
                        written += len(chunk)
                        if written > ref.size:
                            break
                        fh.write(chunk)
            if written > ref.size:
                part.unlink(missing_ok=True)
                raise IntegrityError(f"{ref.name}: the coordinator sent more than its listed {ref.size} bytes")
            if finish() is None:
                raise IntegrityError(f"{ref.name}: the download did not match sha256 {ref.sha256[:12]}...")
            return dest

        return call_with_retry(once, _retryable, self.backoff, self.on_retry)

    # -- admin ---------------------------------------------------------------------------
    # With the admin token (`token=`); `run_status`, `round_summary` and `builds` above serve
    # the admin too.

    def create_run(self, spec: RunSpec) -> RunCreated:
        """Create a run (a resend of the same spec and enroll token answers the same run)."""
        return self._call("POST", "/v1/runs", RunCreated, json=spec.model_dump(mode="json"))

    def list_runs(self) -> list[RunStatus]:
        return _list_of(RunStatus, self._call("GET", "/v1/runs"))

    def stop_run(self, run_id: str) -> RunStatus:
        """End a running run now; a run already over is a CoordinatorError 409 `run_over`."""
        return self._call("POST", f"/v1/runs/{run_id}/stop", RunStatus)

    def list_devices(self, run_id: str) -> list[DeviceInfo]:
        return _list_of(DeviceInfo, self._call("GET", f"/v1/runs/{run_id}/clients"))

    def revoke_device(self, client_id: str) -> None:
        """Revoke a device's token: it is refused (403) from then on. Revoking twice is harmless."""
        self._call("DELETE", f"/v1/clients/{client_id}")

    def list_builds(self, run_id: str) -> list[BuildInfo]:
        return self.builds(run_id).builds

    def publish_builds(self, run_id: str, targets: list[str]) -> list[BuildInfo]:
        """Export the run's SLM to edge builds now, e.g. targets ["gguf:q8_0", "onnx:int8"]."""
        return _list_of(BuildInfo, self._call("POST", f"/v1/runs/{run_id}/builds", json={"targets": targets}))

    def healthz(self) -> dict[str, Any]:
        return self._call("GET", "/healthz")


def _list_of(model: type[M], data: Any) -> list[M]:
    return TypeAdapter(list[model]).validate_python(data)  # type: ignore[valid-type]


def _tls_context(verify: bool | str | Path) -> bool | ssl.SSLContext:
    """A CA bundle path becomes an SSL context that trusts it (e.g. a self-signed coordinator)."""
    if isinstance(verify, bool):
        return verify
    path = Path(verify)
    if not path.is_file():
        raise FileNotFoundError(f"CA certificate {path} does not exist")
    return ssl.create_default_context(cafile=str(path))
