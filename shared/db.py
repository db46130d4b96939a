"""Database plumbing: engines, units of work and Alembic migrations.

SQL statements live in `shared.repository`; this module only opens connections and
transactions and runs migrations.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import psycopg2
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).with_name("migrations")
T = TypeVar("T")


class DatabaseUnavailable(Exception):
    """Postgres could not be reached or refused the write.

    `stale_connection` is true when a pooled connection turned out dead (Postgres restarted);
    the pool has then been emptied and an immediate retry gets a fresh connection.
    """

    def __init__(self, message: str, stale_connection: bool = False):
        super().__init__(message)
        self.stale_connection = stale_connection


def sqlalchemy_url(url: str) -> str:
    """Normalise a `postgres://`/`postgresql://` URL to the psycopg2 dialect."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql+psycopg2://{rest}" if scheme in ("postgres", "postgresql") else url


def make_engine(url: str, pool_size: int = 16, pre_ping: bool = True) -> Engine:
    """An engine with short connect timeouts so an outage fails fast instead of hanging.

    `pre_ping` tests each connection on checkout (one round trip); a caller that retries on
    `DatabaseUnavailable.stale_connection` instead can turn it off. Connections open on demand, so
    a process that runs one thing at a time holds one; `pool_size` covers a thread pool (the
    real-time worker's threads) without opening and closing overflow connections per task.
    """
    return sa.create_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        connect_args={"connect_timeout": 3, "application_name": application_name()},
    )


def application_name() -> str:
    """`relay-<pid>`, plus `-nice<N>` when this process runs at a lowered CPU priority: `relay up`
    gives the embedded Postgres backend serving it the same niceness (`cli.supervisor.nice_backends`),
    so a niced worker's queries do not take the CPU from the listener's."""
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    return f"relay-{os.getpid()}" + (f"-nice{nice}" if nice > 0 else "")


@contextlib.contextmanager
def unit_of_work(engine: Engine) -> Iterator[Connection]:
    """One transaction: committed when the block ends normally, rolled back otherwise."""
    try:
        with engine.begin() as conn:
            try:
                yield conn
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:  # from a raw cursor (bulk SQL)
                if _refused_statement(exc):
                    raise
                stale = bool(conn.connection.driver_connection.closed)
                conn.invalidate()
                raise DatabaseUnavailable(_first_line(exc), stale_connection=stale) from exc
    except sa.exc.DBAPIError as exc:
        if not (isinstance(exc, sa.exc.OperationalError) or exc.connection_invalidated) or _refused_statement(exc.orig):
            raise
        message = str(exc.orig).strip().splitlines()[0] if exc.orig and str(exc.orig).strip() else str(exc)
        raise DatabaseUnavailable(message, stale_connection=exc.connection_invalidated) from exc


class KeptConnections:
    """One psycopg2 connection per thread, kept open in autocommit: the listener's single-statement insert
    without a pool checkout and checkin (about 0.1 ms of CPU per request with SQLAlchemy's pool).

    A connection that fails is closed and dropped; `DatabaseUnavailable.stale_connection` says it had
    been open before (Postgres restarted under it), so `once_more_if_stale` retries on a new one.
    A forked child opens its own.
    """

    def __init__(self, url: str):
        self._url = url
        self._local = threading.local()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._local = threading.local()

    @contextlib.contextmanager
    def autocommit(self) -> Iterator:
        """This thread's connection; each statement commits itself."""
        conn = getattr(self._local, "conn", None)
        kept = conn is not None
        try:
            if conn is None:
                conn = psycopg2.connect(self._url, connect_timeout=3, application_name=application_name())
                conn.autocommit = True
                self._local.conn = conn
            yield conn
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            self._local.conn = None
            stale = kept and bool(conn.closed)
            if conn is not None and not conn.closed:
                conn.close()
            raise DatabaseUnavailable(_first_line(exc), stale_connection=stale) from exc

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None and not conn.closed:
            conn.close()


def once_more_if_stale(fn: Callable[..., T], *args) -> T:
    """`fn(*args)`, run a second time if it met a pooled connection that died with a Postgres restart.

    For callers that skip the pre-ping round trip (the listener, the workers) and whose `fn` is
    safe to replay. Any other `DatabaseUnavailable` (Postgres down) is raised.
    """
    try:
        return fn(*args)
    except DatabaseUnavailable as exc:
        if not exc.stale_connection:
            raise
    return fn(*args)


def _refused_statement(exc: BaseException | None) -> bool:
    """An OperationalError that is about the statement, not the server: SQLSTATE class 54 (program limit
    exceeded, e.g. "index row size exceeds maximum" for a 4,000-character customer id). Retrying it
    as an outage would never end; it is raised as it is, so the caller's attempt bound parks the work
    with this reason."""
    return str(getattr(exc, "pgcode", None) or "").startswith("54")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def alembic_config(url: str):
    """An Alembic config pointing at the packaged migrations and `url`."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision` (idempotent; concurrent callers serialise on an advisory lock)."""
    from alembic import command

    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(724311)"))
            try:
                cfg = alembic_config(url)
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                conn.commit()
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(724311)"))
                conn.commit()
    finally:
        engine.dispose()
