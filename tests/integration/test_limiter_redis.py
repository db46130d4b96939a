"""The shared rate limit holds across threads and processes against a real Redis.

Uses the test session's Redis (TEST_REDIS_URL, or the embedded one; see tests/conftest.py).
"""
from __future__ import annotations

import math
import multiprocessing
import threading
import time
import uuid

import pytest

redis = pytest.importorskip("redis")

from shared.optimove.limiter import RateLimiter  # noqa: E402
from shared.settings import RateLimit, Secret  # noqa: E402

pytestmark = pytest.mark.integration

LIMIT = RateLimit(20, 2.0)
DURATION = 11.0
THREADS = 4
PROCESSES = 3


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _hammer(url: str, prefix: str, end: float, out: list[float]) -> None:
    """Take slots until `end` (epoch seconds), sleeping each returned wait; record server grant times."""
    limiter = RateLimiter(redis.Redis.from_url(url), Secret("hammer-key"), LIMIT, prefix=prefix)
    while time.time() < end:
        wait, at = limiter.try_acquire_at()
        if wait == 0.0:
            out.append(at)
        else:
            time.sleep(min(wait, max(0.0, end - time.time())))


def _process(url: str, prefix: str, end: float, queue) -> None:
    grants: list[float] = []
    _hammer(url, prefix, end, grants)
    queue.put(grants)


def test_limit_holds_across_threads_and_processes(redis_client, redis_url):
    prefix = f"test:rl:{uuid.uuid4().hex}"
    start = time.time() + 0.5
    end = start + DURATION
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_process, args=(redis_url, prefix, end, queue)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    thread_grants: list[float] = []
    threads = [threading.Thread(target=_hammer, args=(redis_url, prefix, end, thread_grants)) for _ in range(THREADS)]
    time.sleep(max(0.0, start - time.time()))
    for t in threads:
        t.start()
    grants = [g for _ in procs for g in queue.get(timeout=DURATION + 10)]
    for t in threads:
        t.join()
    for p in procs:
        p.join(timeout=5)
    grants = sorted(grants + thread_grants)
    seconds, micros = redis_client.time()
    server_end = seconds + micros / 1e6
    for key in redis_client.scan_iter(f"{prefix}:*"):
        redis_client.delete(key)

    for i in range(len(grants) - LIMIT.count):
        gap_us = round((grants[i + LIMIT.count] - grants[i]) * 1e6)
        assert gap_us >= LIMIT.seconds * 1e6, f"{LIMIT.count + 1} grants within {gap_us} µs from grant {i}"
    span = min(server_end, end) - grants[0]
    theoretical = LIMIT.count * math.ceil(span / LIMIT.seconds)
    assert len(grants) >= 0.9 * theoretical, (len(grants), theoretical)
    print(f"{len(grants)} grants of {theoretical} possible in {span:.2f}s")


def test_a_waiting_priority_caller_gets_the_next_free_slot_before_ordinary_callers(redis_client):
    from tests.conftest import poll

    prefix = f"test:priority:{uuid.uuid4().hex}"
    limiter = RateLimiter(redis_client, Secret("priority-key"), RateLimit(2, 1.0), prefix=prefix, margin=0.0)
    assert limiter.try_acquire() == 0.0 and limiter.try_acquire() == 0.0  # the window is full
    wait, asked_at = limiter.try_acquire_at(priority=True)
    assert 0 < wait <= 1.0  # the report waits, and holds ordinary callers back meanwhile
    # the window's clock is Redis' own: wait until it has passed the moment a slot frees up
    poll(lambda: float(redis_client.time()[0]) + redis_client.time()[1] / 1e6 > asked_at + wait + 0.01, 3,
         message="a slot to free up")
    assert limiter.try_acquire() > 0, "an ordinary caller took the slot the report was waiting for"
    assert poll(lambda: limiter.try_acquire(priority=True) == 0.0, 3, message="the report's slot")
    assert limiter.try_acquire() == 0.0  # with the report served, ordinary callers go on
