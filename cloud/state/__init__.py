"""The coordinator's state: one interface, its records, and the SQL backend
(ARCHITECTURE.md, "State interface")."""

from __future__ import annotations

from cloud.state.base import CoordinatorState, RunExists, RunFull, StateError, StateUnavailable
from cloud.state.sql import SqlState

__all__ = ["CoordinatorState", "RunExists", "RunFull", "SqlState", "StateError", "StateUnavailable"]
