"""Fixtures for tests that run real relay processes (e2e and faults)."""
from __future__ import annotations

import pytest

from tests.harness import Processes


@pytest.fixture
def procs(tmp_path, request):
    """Relay processes for one test; their logs are printed when the test fails."""
    processes = Processes(tmp_path)
    yield processes
    processes.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(processes.logs())


@pytest.fixture
def simulator():
    """The fake Optimove and fake bonus system on loopback (threads of this process)."""
    from simulator.server import start

    running = start(api_key="sim-api-key-0123456789")
    yield running
    running.stop()


@pytest.fixture
def make_simulator():
    """Start a simulator with a chosen Optimove rate limit and bonus faults; stopped after the test."""
    from simulator.server import start

    started = []

    def factory(rate_limit=(50, 10.0), **bonus_faults):
        running = start(api_key="sim-api-key-0123456789", rate_limit=rate_limit, **bonus_faults)
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop()


@pytest.fixture
def private_redis(tmp_path):
    """URL of a Redis server owned by this test alone (no AOF), for tests that kill or restart things."""
    from cli.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "private-redis", appendonly=False)
    server.start()
    yield server.url
    server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
