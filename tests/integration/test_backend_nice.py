"""`relay up` gives the embedded Postgres backend of a niced relay process that process's niceness."""
from __future__ import annotations

import os
import subprocess
import sys

import psycopg2
import pytest

from cli.supervisor import nice_backends
from tests.harness import ROOT

pytestmark = pytest.mark.integration


def _backend(dsn: str, name: str):
    conn = psycopg2.connect(dsn, application_name=name)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return conn, cur.fetchone()[0]


def test_backends_named_nice_get_that_niceness_once(database_url):
    admin = psycopg2.connect(database_url)
    admin.autocommit = True
    niced, niced_pid = _backend(database_url, "relay-4242-nice7")
    plain, plain_pid = _backend(database_url, "relay-4343")
    other, other_pid = _backend(database_url, "psql-nice9")  # not a relay process: left alone
    try:
        done: set[int] = set()
        assert nice_backends(admin, done) == 1
        assert os.getpriority(os.PRIO_PROCESS, niced_pid) == 7
        assert os.getpriority(os.PRIO_PROCESS, plain_pid) == 0
        assert os.getpriority(os.PRIO_PROCESS, other_pid) == 0
        assert done == {niced_pid} and nice_backends(admin, done) == 0  # set once
        niced.close()
        nice_backends(admin, done)
        assert niced_pid not in done  # an ended backend is forgotten (its pid may be reused)
    finally:
        for conn in (niced, plain, other, admin):
            conn.close()


def test_a_niced_process_says_so_in_its_application_name():
    code = "from shared.db import application_name; print(application_name())"
    plain = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    niced = subprocess.run(["nice", "-n", "10", sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, check=True)
    own = os.getpriority(os.PRIO_PROCESS, 0)  # the test runner's own niceness (0 unless run under nice)
    assert plain.stdout.strip().startswith("relay-")
    assert ("-nice" in plain.stdout) == (own > 0)
    assert niced.stdout.strip().endswith(f"-nice{min(own + 10, 19)}")
