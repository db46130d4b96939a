"""RateLimiter on fakeredis (its Lua support needs the `lupa` package)."""
from __future__ import annotations

import time

import pytest

pytest.importorskip("lupa", reason="fakeredis runs Lua scripts only with lupa installed")
fakeredis = pytest.importorskip("fakeredis")

from shared.optimove.limiter import RateLimiter, limiter_key  # noqa: E402
from shared.settings import RateLimit, Secret  # noqa: E402

KEY = "optimove-api-key-SECRET"


@pytest.fixture
def redis():
    return fakeredis.FakeRedis()


def test_grants_up_to_count_then_returns_wait(redis):
    limiter = RateLimiter(redis, Secret(KEY), RateLimit(3, 0.4), margin=0)
    assert limiter.try_acquire() == 0.0
    time.sleep(0.15)
    assert [limiter.try_acquire() for _ in range(2)] == [0.0, 0.0]
    wait = limiter.try_acquire()
    assert 0 < wait <= 0.4 - 0.15
    time.sleep(wait)
    assert limiter.try_acquire() == 0.0
    assert limiter.try_acquire() > 0


def test_denied_attempts_take_no_slot(redis):
    limiter = RateLimiter(redis, Secret(KEY), RateLimit(1, 0.3), margin=0)
    assert limiter.try_acquire() == 0.0
    for _ in range(5):
        assert limiter.try_acquire() > 0
    assert redis.zcard(limiter.key) == 1


def test_key_is_hashed_and_expires(redis):
    limiter = RateLimiter(redis, Secret(KEY), RateLimit(5, 2.0), prefix="t:rl", margin=0)
    limiter.try_acquire()
    keys = [k.decode() for k in redis.keys("*")]
    assert keys == [limiter_key(Secret(KEY), "t:rl")]
    assert keys[0].startswith("t:rl:") and KEY not in keys[0] and len(keys[0]) == len("t:rl:") + 64
    assert 0 < redis.pttl(limiter.key) <= 2001
    assert KEY not in repr(limiter)


def test_keys_are_separate_per_api_key(redis):
    a = RateLimiter(redis, Secret("key-a"), RateLimit(1, 5.0), margin=0)
    b = RateLimiter(redis, Secret("key-b"), RateLimit(1, 5.0), margin=0)
    assert a.try_acquire() == 0.0
    assert b.try_acquire() == 0.0
    assert a.try_acquire() > 0


def test_two_limiters_on_one_key_share_the_budget(redis):
    limit = RateLimit(4, 5.0)
    first, second = RateLimiter(redis, Secret(KEY), limit, margin=0), RateLimiter(redis, Secret(KEY), limit, margin=0)
    granted = [l.try_acquire() == 0.0 for _ in range(4) for l in (first, second)]
    assert granted.count(True) == 4


def test_acquire_sleeps_the_returned_wait(redis):
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        time.sleep(seconds)

    limiter = RateLimiter(redis, Secret(KEY), RateLimit(2, 0.3), sleep=sleep, margin=0)
    assert limiter.acquire(1.0) and limiter.acquire(1.0)
    assert limiter.acquire(1.0)
    assert len(sleeps) == 1 and 0 < sleeps[0] <= 0.3


def test_acquire_gives_up_at_deadline_without_sleeping(redis):
    sleeps = []
    limiter = RateLimiter(redis, Secret(KEY), RateLimit(1, 5.0), sleep=sleeps.append, margin=0)
    assert limiter.acquire(0.1)
    assert limiter.acquire(0.5) is False
    assert sleeps == []


def test_default_margin_widens_the_window_for_transit_time(redis):
    limiter = RateLimiter(redis, Secret(KEY), RateLimit(1, 10.0))
    assert limiter.margin == pytest.approx(0.2)
    assert limiter.try_acquire() == 0.0
    assert 10.0 < limiter.try_acquire() <= 10.2
