"""Fixtures for tests that run real relay processes."""
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
