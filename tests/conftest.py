"""Shared pytest fixtures.  Each package owns one clearly marked section."""

from __future__ import annotations

# =============================================================================
# storage fixtures: `store_url` / `store`, parametrized over SQLite and PostgreSQL
# =============================================================================
import os as _storage_os
import uuid as _storage_uuid
from collections.abc import Iterator as _StorageIterator

import pytest

STORAGE_PG_URL_ENV = "DISTILLERY_TEST_PG_URL"
STORAGE_PG_DEFAULT_URL = "postgresql+psycopg://distillery:distillery@127.0.0.1:5432/distillery_test"


def _storage_pg_base_url() -> str:
    return _storage_os.environ.get(STORAGE_PG_URL_ENV, STORAGE_PG_DEFAULT_URL)


def _storage_pg_unavailable(reason: str) -> None:
    """Fail under CI (a silently skipped backend is a hole), skip loudly elsewhere."""
    msg = (
        f"PostgreSQL not reachable at {_storage_pg_base_url()} ({reason}); "
        f"start it with `scripts/start_postgres.sh` (as root) or set {STORAGE_PG_URL_ENV}"
    )
    if _storage_os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def _storage_pg_admin():  # type: ignore[no-untyped-def]
    """AUTOCOMMIT engine on the base test database, used to create per-test databases."""
    from sqlalchemy import create_engine, text

    engine = create_engine(
        _storage_pg_base_url(), isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    failure: str | None = None
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any connect failure means "unreachable"
        failure = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    if failure is not None:
        engine.dispose()
        _storage_pg_unavailable(failure)
    yield engine
    engine.dispose()


def _storage_pg_fresh_db(admin) -> _StorageIterator[str]:  # type: ignore[no-untyped-def]
    """Create a uniquely named empty database for one test and drop it afterwards."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    name = f"distillery_t_{_storage_uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(_storage_pg_base_url()).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path) -> _StorageIterator[str]:  # type: ignore[no-untyped-def]
    """URL of an empty database (a tmp SQLite file, or a fresh PostgreSQL database)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'distillery.db'}"
    else:
        admin = request.getfixturevalue("_storage_pg_admin")
        yield from _storage_pg_fresh_db(admin)


@pytest.fixture
def store(store_url):  # type: ignore[no-untyped-def]
    """A migrated :class:`storage.Store` on an empty database; disposed afterwards."""
    from storage import Store

    s = Store(store_url)
    try:
        yield s
    finally:
        s.dispose()


# ============================ end of storage fixtures ========================


# =============================================================================
# engine fixtures: each test gets its own soft-label store folder
# =============================================================================


@pytest.fixture(autouse=True, scope="session")
def session_soft_labels_root(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Module-scoped fixtures train before the per-test folder below is set: they get the session's folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTILLERY_SOFT_LABELS", str(tmp_path_factory.mktemp("session_soft_labels")))
        yield


@pytest.fixture(autouse=True)
def soft_labels_root(tmp_path_factory, monkeypatch):  # type: ignore[no-untyped-def]
    """Augmented runs write teacher soft labels (kd_core.engine.soft_labels): never into the checkout, never
    shared between tests (a test's run would otherwise read another test's labels)."""
    root = tmp_path_factory.mktemp("soft_labels")
    monkeypatch.setenv("DISTILLERY_SOFT_LABELS", str(root))
    return root


# ============================ end of engine fixtures =========================
