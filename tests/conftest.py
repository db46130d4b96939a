"""Shared fixtures: real Postgres and Redis for integration tests.

`TEST_DATABASE_URL` / `TEST_REDIS_URL` point at servers to use; when unset, embedded servers are
started once per test session under a temporary folder. Each session gets its own database,
built by the Alembic migrations; each test starts from empty tables and an empty Redis db.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789abcdef"
ADMIN_PASSWORD = "admin-password-for-tests"


def pytest_configure(config):
    """A SIGTERM (a CI timeout) ends the session like Ctrl-C, so fixtures stop the servers they started."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def poll(predicate, timeout: float = 30.0, interval: float = 0.05, message: str = "condition"):
    """Call `predicate` until it returns a truthy value or `timeout` passes (then fail naming `message`)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message} (last: {last!r})")


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def embedded_dir():
    path = Path(tempfile.mkdtemp(prefix="relay-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server(embedded_dir):
    """URL of a Postgres server's maintenance database (shared or embedded)."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    from cli.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(embedded_dir / "pg")
    pg.start()
    yield pg.admin_url
    pg.stop()


def _per_worker_db(url: str) -> str:
    """`url` for this pytest process: under xdist (`make test` runs two workers) worker N uses the
    database N above the one given, so the workers never flush each other's keys."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return url
    base, _, db = url.rstrip("/").rpartition("/")
    if not db.isdigit() or "://" not in base:
        base, db = url.rstrip("/"), "0"
    return f"{base}/{(int(db) + int(worker[2:])) % 16}"


@pytest.fixture(scope="session")
def redis_server(embedded_dir):
    """URL of a Redis database for the tests (shared server db 15, or embedded)."""
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        yield _per_worker_db(url)
        return
    from cli.embedded import EmbeddedRedis

    server = EmbeddedRedis(embedded_dir / "redis", appendonly=False)
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def database_url(pg_server):
    """A fresh database for this test session, migrated to head."""
    from shared.db import upgrade

    name = f"relay_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(pg_server)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    url = _with_db(pg_server, name)
    upgrade(url)
    yield url
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.fixture
def db(database_url):
    """Empty tables; yields a psycopg2 connection in autocommit for assertions."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("TRUNCATE grants, sends, revokes, promotion_statuses, cancelled_customers, deactivations, "
                    "campaign_runs, notifications RESTART IDENTITY CASCADE")
    yield conn
    conn.close()


@pytest.fixture
def redis_url(redis_server):
    """An emptied Redis database."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    yield redis_server
    client.flushdb()
    client.close()


def make_settings(**overrides):
    """Settings for tests, from explicit values only (the test runner's environment is not read)."""
    from shared.settings import Settings

    env = {"RELAY_LISTENER_TOKENS": TOKEN, "RELAY_ADMIN_PASSWORD": ADMIN_PASSWORD, "RELAY_SWEEP_AFTER": "60"}
    env.update({k: str(v) for k, v in overrides.items() if v is not None})
    return Settings.from_env(env)


@pytest.fixture
def settings(database_url, redis_url, db):
    return make_settings(DATABASE_URL=database_url, REDIS_URL=redis_url)


def count(conn, sql: str, *args) -> int:
    """First column of the first row of `sql`."""
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()[0]


def queue_lengths(redis_url: str) -> dict[str, int]:
    """Messages waiting in each relay queue (Celery's Redis transport keeps a list per queue)."""
    import redis

    from shared.dispatch import QUEUES

    client = redis.Redis.from_url(redis_url)
    try:
        return {q: client.llen(q) for q in QUEUES}
    finally:
        client.close()


def new_token() -> str:
    return secrets.token_urlsafe(24)


class BrokerURL(str):
    """A `BROKER_URL` for one test (`broker` fixture): `kind` is redis or amqp; for amqp, `server` (a
    `tests.rabbitmq.RabbitMQ`) and `vhost` name where the test's queues live."""

    kind: str
    server = None
    vhost: str | None = None


@pytest.fixture(scope="session")
def rabbitmq():
    """A RabbitMQ server for the amqp variants (see tests/rabbitmq.py): the one at `TEST_RABBITMQ_URL`
    (default 127.0.0.1:5672) or a private one for the session; skips those variants, saying why, without."""
    import warnings

    from tests.rabbitmq import DEFAULT_URL, HOW_TO, PrivateServer, shared_server

    server, why = shared_server(os.environ.get("TEST_RABBITMQ_URL") or DEFAULT_URL)
    if server is not None:
        yield server
        return
    base = Path(tempfile.mkdtemp(prefix="relay-rabbitmq-"))
    private = PrivateServer(base)
    try:
        server = private.start()
    except Exception as exc:
        private.stop()
        shutil.rmtree(base, ignore_errors=True)
        reason = (f"RabbitMQ (amqp) variants skipped: {why}, and a private rabbitmq-server did not start ({exc}). "
                  f"To run them, {HOW_TO}")
        warnings.warn(reason)
        pytest.skip(reason)
    yield server
    private.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["redis", "amqp"])
def broker(request):
    """`BROKER_URL` for one test, which runs once per broker. redis: the test's Redis (`private_redis` when the
    test uses it, else `redis_url`); amqp: a fresh vhost on the `rabbitmq` server, deleted afterwards."""
    if request.param == "redis":
        fixture = "private_redis" if "private_redis" in request.fixturenames else "redis_url"
        url = BrokerURL(request.getfixturevalue(fixture))
        url.kind = "redis"
        yield url
        return
    server = request.getfixturevalue("rabbitmq")
    vhost, raw = server.add_vhost()
    url = BrokerURL(raw)
    url.kind, url.server, url.vhost = "amqp", server, vhost
    try:
        yield url
    finally:
        server.delete_vhost(vhost)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With RELAY_FAULTS_REPORT=FILE (`make faults-report`), append one JSON line per test: what it
    injected (its docstring), its outcome, duration, the figures it printed and the ones it recorded with
    `record_property` (`recovery_s`, `lost`, `duplicates`, ...)."""
    outcome = yield
    path = os.environ.get("RELAY_FAULTS_REPORT")
    report = outcome.get_result()
    if not path or report.when != "call":
        return
    import json

    doc = " ".join((getattr(item.function, "__doc__", None) or item.module.__doc__ or "").split())
    line = json.dumps({"nodeid": item.nodeid, "outcome": report.outcome, "seconds": round(report.duration, 1),
                       "doc": doc, "printed": report.capstdout.strip(),
                       "properties": {k: v for k, v in item.user_properties}}, default=str) + "\n"
    # one write(2) per line in append mode: the lines of parallel pytest workers (xdist) never interleave
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)
