"""The coordinator's Prometheus figures (ARCHITECTURE.md, "Layers"): one registry per
app, an ASGI middleware for HTTP latency and bytes, and event functions that the round driver
and the services call, so no other module touches prometheus-client.

Events reach the app they happened in: a request binds its app's `Telemetry` for its duration
(the binding follows it into the thread pool), and work outside a request (the round driver's
thread) goes to the process's one live app. A process with several live apps (tests) records
only request-bound events rather than mixing the apps' figures; one with none records nothing.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cloud.errors import ApiError
from common.protocol import RoundState, RunState

if TYPE_CHECKING:
    from cloud.state import CoordinatorState
    from cloud.state.records import RoundRecord

log = logging.getLogger("cotune.telemetry")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Requests: milliseconds to minutes (uploads and downloads of adapters take long).
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Round phases and the slow steps: seconds to hours (a collecting phase waits for its deadline).
_PHASE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
# A path no route matched is labelled with this, never with the path itself: labels stay bounded
# whatever a client asks for.
UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

F = TypeVar("F", bound=Callable[..., Any])


class _StateCollector(Collector):
    """Runs by state, devices by state and stored updates, read from the state at scrape time
    (so every replica sharing a database reports the same figures)."""

    def __init__(self) -> None:
        self.state: CoordinatorState | None = None

    def collect(self) -> Iterable[Metric]:
        state = self.state
        if state is None:
            return []
        try:
            counts = state.counts()
            active = sum(state.count_active_clients(run.id) for run in state.list_runs())
        except Exception:  # a database hiccup: serve the process's own figures without these
            log.warning("metrics: reading the state's counts failed; this scrape goes without them", exc_info=True)
            return []
        runs = GaugeMetricFamily("cotune_runs", "runs by state", labels=["state"])
        for name in (s.value for s in RunState):
            runs.add_metric([name], counts.runs_by_state.get(name, 0))
        devices = GaugeMetricFamily("cotune_devices", "enrolled devices by state", labels=["state"])
        devices.add_metric(["enrolled"], active)
        devices.add_metric(["revoked"], max(0, counts.clients - active))
        # The figure /metrics had before cotune_devices; kept so existing scrapers and alerts still find it.
        clients = GaugeMetricFamily("cotune_clients", "devices ever enrolled, revoked ones included", counts.clients)
        updates = GaugeMetricFamily("cotune_updates_stored", "accepted updates held in the state")
        updates.add_metric([], counts.updates)
        return [runs, devices, clients, updates]


class Telemetry:
    """One app's registry and instruments."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_seconds = Histogram("cotune_http_request_duration_seconds", "HTTP request latency",
                                      ["method", "route", "status"], buckets=_HTTP_BUCKETS, registry=r)
        self.http_in = Counter("cotune_http_request_bytes", "request body bytes received",
                               ["method", "route"], registry=r)
        self.http_out = Counter("cotune_http_response_bytes", "response body bytes sent",
                                ["method", "route"], registry=r)
        self.phase_seconds = Histogram("cotune_round_phase_seconds", "seconds a round spent in a state, "
                                       "observed as it left it", ["phase"], buckets=_PHASE_BUCKETS, registry=r)
        self.aggregation_seconds = Histogram("cotune_aggregation_seconds", "seconds one round's aggregation took",
                                             buckets=_PHASE_BUCKETS, registry=r)
        self.server_step_seconds = Histogram("cotune_server_step_seconds", "seconds one round's server step took",
                                             buckets=_PHASE_BUCKETS, registry=r)
        self.updates_accepted = Counter("cotune_updates_accepted", "updates accepted (new, not replays)",
                                        registry=r)
        self.updates_refused = Counter("cotune_updates_refused", "updates refused, by the error code answered",
                                       ["reason"], registry=r)
        self.generate_seconds = Histogram("cotune_generate_seconds", "POST /v1/generate: seconds from admission "
                                          "to answer (waiting for the model lock included)",
                                          buckets=_HTTP_BUCKETS, registry=r)
        self.generate_queue = Gauge("cotune_generate_queue", "POST /v1/generate: requests admitted and not yet "
                                    "answered (waiting for or holding the model lock)", registry=r)
        self.generate_refused = Counter("cotune_generate_refused", "POST /v1/generate: 429s, by reason",
                                        ["reason"], registry=r)
        self._state = _StateCollector()
        r.register(self._state)
        # (run id, round number) -> (state, when it was entered), for rounds this process moved;
        # an entry leaves when its round closes or fails, so there is one per live round at most.
        self._entered: dict[tuple[str, int], tuple[RoundState, float]] = {}
        self._lock = threading.Lock()

    def watch(self, state: CoordinatorState | None) -> None:
        """Report `state`'s counts at each scrape (None: stop)."""
        self._state.state = state

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def round_phase(self, rnd: RoundRecord, old: RoundState, new: RoundState) -> None:
        key = (rnd.run_id, rnd.number)
        now = time.monotonic()
        with self._lock:
            entered = self._entered.pop(key, None)
            if new not in (RoundState.closed, RoundState.failed):
                self._entered[key] = (new, now)
        if entered is not None and entered[0] == old:
            self.phase_seconds.labels(old.value).observe(max(0.0, now - entered[1]))
            return
        # Not seen entering here (a restart, another replica): the state's own timestamps, where it keeps one.
        since = {RoundState.open: rnd.opened_at, RoundState.collecting: rnd.collecting_at}.get(old)
        if since is not None:
            wall = datetime.now(timezone.utc) - _aware(since)
            self.phase_seconds.labels(old.value).observe(max(0.0, wall.total_seconds()))


# -- which app an event belongs to ---------------------------------------------------------

_bound: contextvars.ContextVar[Telemetry | None] = contextvars.ContextVar("cotune_telemetry", default=None)
_live: list[Telemetry] = []
_live_lock = threading.Lock()


def live(telemetry: Telemetry, state: CoordinatorState) -> None:
    """Mark an app's telemetry live, reporting `state`, until `retire` (see the module's docstring)."""
    telemetry.watch(state)
    with _live_lock:
        _live.append(telemetry)


def retire(telemetry: Telemetry) -> None:
    telemetry.watch(None)
    with _live_lock:
        if telemetry in _live:
            _live.remove(telemetry)


def current() -> Telemetry | None:
    bound = _bound.get()
    if bound is not None:
        return bound
    with _live_lock:
        return _live[0] if len(_live) == 1 else None


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)


# -- events (the only way other modules record figures) ------------------------------------


def round_phase(rnd: RoundRecord, old: RoundState, new: RoundState) -> None:
    """A round moved from `old` to `new`: observe the seconds it spent in `old`."""
    if (t := current()) is not None:
        t.round_phase(rnd, old, new)


def stopwatch() -> Callable[[], float]:
    """Seconds since this call, each time the returned function is called."""
    started = time.perf_counter()
    return lambda: time.perf_counter() - started


def aggregated(seconds: float) -> None:
    if (t := current()) is not None:
        t.aggregation_seconds.observe(seconds)


def server_stepped(seconds: float) -> None:
    if (t := current()) is not None:
        t.server_step_seconds.observe(seconds)


def update_refused(reason: str) -> None:
    if (t := current()) is not None:
        t.updates_refused.labels(reason).inc()


def update_accepted() -> None:
    if (t := current()) is not None:
        t.updates_accepted.inc()


def generate_refused(reason: str) -> None:
    if (t := current()) is not None:
        t.generate_refused.labels(reason).inc()


def counts_updates(method: F) -> F:
    """Decorates an update check or acceptance: an `ApiError` it raises counts as a refusal under
    its code; a receipt it returns for a new (not replayed) update counts as accepted."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = method(*args, **kwargs)
        except ApiError as exc:
            update_refused(exc.detail.code)
            raise
        if result is not None and getattr(result, "duplicate", True) is False:
            update_accepted()
        return result

    return wrapper  # type: ignore[return-value]


def times_generation(method: F) -> F:
    """Decorates the admitted part of a generation: the queue gauge while it runs, its seconds after."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = current()
        if t is None:
            return method(*args, **kwargs)
        started = time.perf_counter()
        t.generate_queue.inc()
        try:
            return method(*args, **kwargs)
        finally:
            t.generate_queue.dec()
            t.generate_seconds.observe(time.perf_counter() - started)

    return wrapper  # type: ignore[return-value]


# -- HTTP ----------------------------------------------------------------------------------


class MetricsMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware: that would buffer streamed artifacts): latency by route
    template and status, request and response body bytes, and the app's telemetry bound for the
    request so services record into it."""

    def __init__(self, app: Any, telemetry: Telemetry) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = {"in": 0, "out": 0, "status": 500}

        async def counting_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                seen["in"] += len(message.get("body", b""))
            return message

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        token = _bound.set(self.telemetry)
        started = time.perf_counter()
        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            _bound.reset(token)
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            method = scope.get("method", "") if scope.get("method") in _METHODS else "other"
            t = self.telemetry
            t.http_seconds.labels(method, route, str(seen["status"])).observe(time.perf_counter() - started)
            t.http_in.labels(method, route).inc(seen["in"])
            t.http_out.labels(method, route).inc(seen["out"])
