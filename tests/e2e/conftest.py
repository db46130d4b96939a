"""End-to-end tests: real relay processes with the simulator."""
from tests.process_fixtures import make_simulator, private_redis, procs, pytest_runtest_makereport, simulator  # noqa: F401
