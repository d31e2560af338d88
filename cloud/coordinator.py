"""The coordinator's parts, wired once: settings, state, blob store, held models and the lock
they share, the services, and the round driver over them."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from cloud.auth import new_token
from cloud.models import ModelHolder
from cloud.rounds import DriverConfig, RoundDriver
from cloud.services.artifacts import ArtifactsService
from cloud.services.auth import AuthService
from cloud.services.builds import BuildsService
from cloud.services.generation import GenerationService
from cloud.services.limits import GenerateLimits
from cloud.services.runs import RunsService, StrategyFactory, strategy_factory
from cloud.services.secagg import SecaggService
from cloud.services.updates import UpdatesService
from cloud.settings import CoordinatorSettings
from cloud.state import CoordinatorState, SqlState
from cloud.store import BlobStore, open_store


class Coordinator:
    def __init__(
        self,
        settings: CoordinatorSettings,
        state: CoordinatorState | None = None,
        store: BlobStore | None = None,
        factory: StrategyFactory | None = None,
    ) -> None:
        """Parts not given are made from `settings`: the state from its URL, the store in its
        artifact directory, strategies by each run's algorithm."""
        self.settings = settings
        self.state = state if state is not None else SqlState(settings.state_url)
        self.store = store if store is not None else open_store(settings)
        self.spool_dir = Path(settings.work_dir) / "uploads"
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.holder = ModelHolder(self.store, device=settings.model_device, dtype=settings.model_dtype,
                                  device_map=settings.model_device_map)
        # Held models are shared by the round driver (server steps) and /v1/generate.
        self.model_lock = threading.Lock()
        self.instance_id = settings.instance_id or f"{socket.gethostname()}:{settings.port}"

        self.auth = AuthService(self.state, settings.admin_token or new_token())
        self.runs = RunsService(self.state, self.store, factory or strategy_factory(self.store, self.holder),
                                self.model_lock)
        self.secagg = SecaggService(self.state, self.runs)
        self.updates = UpdatesService(self.state, self.store, self.runs, self.secagg)
        self.artifacts = ArtifactsService(self.state, self.store)
        self.generation = GenerationService(self.runs, self.holder, self.model_lock, GenerateLimits(
            settings.generate_rate_per_minute, settings.generate_burst, settings.generate_queue))
        self.builds = BuildsService(self.state, self.store, self.runs, self.spool_dir)

    def driver(self) -> RoundDriver:
        config = DriverConfig(instance_id=self.instance_id, lease_s=self.settings.lease_s,
                              tick_s=self.settings.tick_s)
        return RoundDriver(self.state, self.runs, self.store, self.model_lock, config, builds=self.builds)

    def close(self) -> None:
        self.state.close()
