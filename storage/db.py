"""Engine construction, SQLite tuning and programmatic Alembic migrations.

Kept separate from :mod:`storage.store` so that the connection policy (WAL, busy
timeout, explicit ``BEGIN``) lives in one place and is shared by the Store and by
the Alembic ``env.py`` when it is run from the command line.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

DEFAULT_SQLITE_URL = "sqlite:///distillery-data/distillery.db"
ENV_DB_URL = "DISTILLERY_DB_URL"
SQLITE_BUSY_TIMEOUT_S = 30.0
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Execution option read by the SQLite "begin" hook: "DEFERRED" (default) or
# "IMMEDIATE".  IMMEDIATE takes the write lock up front, which is what a
# read-modify-write transaction needs in WAL mode: a deferred transaction that
# reads first and then writes can fail with SQLITE_BUSY_SNAPSHOT, which the busy
# timeout does not retry.
SQLITE_BEGIN_OPTION = "distillery_sqlite_begin"

# Arbitrary constant used as the PostgreSQL advisory-lock key that serialises
# concurrent migrations from several processes.
_PG_MIGRATION_LOCK_KEY = 0x0D157111

_migrated_urls: set[str] = set()
_migrate_lock = threading.Lock()


def default_db_url() -> str:
    """Return ``$DISTILLERY_DB_URL`` or the local SQLite file (creating its folder).

    The default is relative to the current working directory so that a checkout
    run with ``streamlit run`` keeps its data next to it.
    """
    url = os.environ.get(ENV_DB_URL, "").strip()
    if url:
        return url
    Path("distillery-data").mkdir(parents=True, exist_ok=True)
    return DEFAULT_SQLITE_URL


def is_sqlite(url: str) -> bool:
    """True when ``url`` targets SQLite (any driver)."""
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_is_memory(url: str) -> bool:
    database = make_url(url).database
    return database in (None, "", ":memory:")


def _ensure_sqlite_parent_dir(url: str) -> None:
    """Create the folder of a SQLite file so the first connect does not fail."""
    if _sqlite_is_memory(url):
        return
    database = make_url(url).database
    assert database is not None
    if database.startswith("file:"):
        return  # URI filenames: leave it to the caller
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _install_sqlite_hooks(engine: Engine) -> None:
    """Set the per-connection PRAGMAs and take over BEGIN from pysqlite.

    pysqlite's own implicit transaction handling starts transactions only before
    DML, which makes SELECT-then-UPDATE non-atomic and DDL non-transactional.
    Emitting BEGIN ourselves (the recipe from the SQLAlchemy docs) gives real
    transactions and lets callers ask for ``BEGIN IMMEDIATE``.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
        if mode not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
            raise ValueError(f"invalid SQLite BEGIN mode {mode!r}")
        conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str) -> Engine:
    """Create an Engine with Distillery's connection policy for ``url``.

    SQLite gets WAL + ``synchronous=NORMAL`` + a 30 s busy timeout (measured
    on this project's machines: zero 'database is locked' errors with concurrent
    writers/readers).  PostgreSQL gets ``pool_pre_ping`` because the dashboard
    is long-lived and the server may be restarted underneath it.
    """
    if is_sqlite(url):
        _ensure_sqlite_parent_dir(url)
        kwargs: dict = {
            "connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
        }
        if _sqlite_is_memory(url):
            # One shared connection, otherwise every checkout sees an empty database.
            kwargs["poolclass"] = StaticPool
        engine = create_engine(url, **kwargs)
        _install_sqlite_hooks(engine)
        return engine
    return create_engine(url, pool_pre_ping=True)


class StoreUnavailable(RuntimeError):
    """The database cannot be opened; the message names the URL (password masked) and the likely fix."""


def masked_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (safe to show and log)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is itself the problem being reported
        return "(unparsable database URL)"


# (substring of the driver's message, what it means and what to do); first match wins
_OPEN_ERROR_HINTS: tuple[tuple[str, str], ...] = (
    ("does not exist", "the database does not exist: create it (e.g. `createdb NAME`) or fix the name in the URL"),
    ("password authentication failed", "wrong user or password: fix them in DISTILLERY_DB_URL"),
    ("no password supplied", "the server wants a password: add it to DISTILLERY_DB_URL"),
    ("connection refused", "no server answers there: start PostgreSQL (`sudo bash scripts/start_postgres.sh`) or fix host and port"),
    ("could not translate host name", "unknown host: fix the host name in the URL"),
    ("timeout expired", "the server did not answer in time: check host, port and firewall"),
    ("readonly database", "the SQLite file or its folder is read-only: make both writable, or point DISTILLERY_DB_URL elsewhere"),
    ("unable to open database file", "the SQLite file cannot be created or opened: check that its folder exists and is writable"),
    ("file is not a database", "that file is not a SQLite database: point DISTILLERY_DB_URL at another file"),
    ("no module named", "the database driver is not installed: `pip install -r requirements.txt`"),
    ("can't load plugin", "unknown database type in the URL: use sqlite:///PATH or postgresql+psycopg://USER:PW@HOST/DB"),
)


def describe_open_error(url: str, exc: BaseException) -> str:
    """One line: which database could not be opened, why, and the likely fix (never a traceback)."""
    detail = " ".join(str(getattr(exc, "orig", None) or exc).split())
    lowered = detail.lower()
    hint = next((fix for needle, fix in _OPEN_ERROR_HINTS if needle in lowered), "check DISTILLERY_DB_URL (or --db)")
    short = detail if len(detail) <= 200 else detail[:197] + "..."
    return f"cannot open the database {masked_url(url)}: {hint} ({short})"


def _alembic_config(url: str, connection: Connection | None = None):  # type: ignore[no-untyped-def]
    """Build an Alembic Config in code (no alembic.ini needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a URL-escaped password ("%40") must be doubled.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def run_migrations(engine: Engine, url: str, *, force: bool = False) -> None:
    """Run ``alembic upgrade head`` once per process per URL.

    The upgrade runs inside one transaction that first takes a cross-process
    lock (``BEGIN IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL) so a
    dashboard and a worker starting at the same moment on a fresh database do
    not both try to create the tables.
    """
    from alembic import command

    with _migrate_lock:
        if url in _migrated_urls and not force:
            return
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                conn.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK_KEY}
                    )
                command.upgrade(_alembic_config(url, conn), "head")
                # a write that changes nothing: a read-only file fails here, at open, not at the first save
                conn.execute(text("DELETE FROM alembic_version WHERE 1 = 0"))
        _migrated_urls.add(url)


def forget_migrations(url: str | None = None) -> None:
    """Forget that ``url`` (or every URL) was migrated; for tests that recreate databases."""
    with _migrate_lock:
        if url is None:
            _migrated_urls.clear()
        else:
            _migrated_urls.discard(url)
