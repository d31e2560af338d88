"""Test-wide settings and the shared tiny world (data, tokenizer, untrained tiny models)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

# Several processes share two cores in these tests; one thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: needs --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory):
    from tests.support import build_tiny_world

    return build_tiny_world(tmp_path_factory.mktemp("world"))


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty database on the PostgreSQL server named by COTUNE_TEST_POSTGRES_URL (which
    .ci/run sets after starting one), dropped afterwards; the test is skipped without one."""
    server = os.environ.get("COTUNE_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("no PostgreSQL server: set COTUNE_TEST_POSTGRES_URL (./dev.sh test starts one)")
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    name = f"cotune_test_{uuid.uuid4().hex[:12]}"
    admin = make_url(server).set(drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path):
    """A fresh, empty state database: a SQLite file, or a new database on a real PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    with postgres_database() as url:
        yield url
