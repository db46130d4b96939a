"""Fault tests: real relay processes, broken on purpose."""
from tests.process_fixtures import make_simulator, private_redis, procs, pytest_runtest_makereport, simulator  # noqa: F401

