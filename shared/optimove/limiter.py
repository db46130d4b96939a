"""One Optimove rate limit shared by every worker on every machine.

A sliding-window log kept in Redis: one sorted set per API key whose members are the grant
times (Redis server clock, microseconds). A Lua script trims, counts and adds atomically, so
at most `limit.count` grants fall in any window of `limit.seconds` seconds, whichever process
or machine asks. Using the server's `TIME` makes machines with skewed clocks agree.

`LocalRateLimiter` is the same window kept in one process, for a command run without Redis;
`limiter_from_settings` picks the shared one when `REDIS_URL` is set.
"""
from __future__ import annotations

import collections
import hashlib
import threading
import time
import uuid
from typing import Callable

from shared.optimove.waits import note_wait
from shared.settings import RateLimit, Secret

# ARGV[4] = '1' for a priority caller (a conditional run's status report). A priority caller that
# finds the window full leaves a mark (KEYS[2]) until the next slot frees up; while the mark is
# there, ordinary callers get no slot, so the next free slot goes to the report, not to a page.
_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local key = KEYS[1]
local mark = KEYS[2]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local priority = ARGV[4] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local waiting = (not priority) and redis.call('EXISTS', mark) == 1
if redis.call('ZCARD', key) < limit and not waiting then
  redis.call('ZADD', key, now, t[1] .. '-' .. t[2] .. ':' .. ARGV[3])
  redis.call('PEXPIRE', key, math.ceil(window / 1000) + 1)
  if priority then redis.call('DEL', mark) end
  return {0, now}
end
local wait = 1000
if redis.call('ZCARD', key) >= limit then
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  wait = tonumber(oldest[2]) + window - now
  if wait < 1 then wait = 1 end
end
if priority then
  redis.call('SET', mark, '1', 'PX', math.ceil(wait / 1000) + 200)
elseif waiting then
  local left = redis.call('PTTL', mark)
  if left > 0 then wait = left * 1000 end
end
return {wait, now}
"""


def limiter_key(api_key: Secret, prefix: str = "relay:ratelimit") -> str:
    """The Redis key for `api_key`: a SHA-256 of the key, never the key itself."""
    return f"{prefix}:{hashlib.sha256(api_key.get().encode()).hexdigest()}"


class _Waits:
    """`acquire` on top of a limiter's `try_acquire`, `_clock` and `_sleep`."""

    def acquire(self, deadline_s: float, priority: bool = False) -> bool:
        """Wait (sleeping the returned waits, never spinning) up to `deadline_s` seconds from now for a slot."""
        end = self._clock() + deadline_s
        while True:
            wait = self.try_acquire(priority)
            if wait == 0.0:
                return True
            if self._clock() + wait > end:
                return False
            self._sleep(wait)


class RateLimiter(_Waits):
    """At most `limit.count` grants per `limit.seconds` for one API key, across all processes."""

    def __init__(self, redis_client, api_key: Secret, limit: RateLimit, prefix: str = "relay:ratelimit",
                 *, margin: float | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.key = limiter_key(api_key, prefix)
        self._script = redis_client.register_script(_SCRIPT)
        # A slot is stamped when taken, but Optimove counts the request when it arrives; the margin
        # keeps a few milliseconds of transit from putting limit+1 requests into Optimove's window.
        self.margin = max(0.1, 0.02 * limit.seconds) if margin is None else margin
        self._window_us = int(round((limit.seconds + self.margin) * 1_000_000))
        self._sleep = sleep
        self._clock = clock

    def __repr__(self) -> str:
        return f"RateLimiter(key={self.key!r}, limit={self.limit})"

    def try_acquire_at(self, priority: bool = False) -> tuple[float, float]:
        """Like `try_acquire`, also returning the Redis server time (epoch seconds) of the attempt."""
        wait_us, now_us = self._script(keys=[self.key, self.key + ":priority"],
                                       args=[self.limit.count, self._window_us, uuid.uuid4().hex,
                                             "1" if priority else "0"])
        if int(wait_us) > 0:  # one refusal: added to the waits the admin page shows
            note_wait(self._script.registered_client, self.key, int(wait_us) / 1_000_000, int(now_us) / 1_000_000,
                      priority)
        return int(wait_us) / 1_000_000, int(now_us) / 1_000_000

    def try_acquire(self, priority: bool = False) -> float:
        """Take a slot: 0.0 if taken (send now), else the seconds until one frees up (> 0). A `priority`
        caller that has to wait holds back ordinary callers until it got its slot."""
        return self.try_acquire_at(priority)[0]


class LocalRateLimiter(_Waits):
    """The sliding window of `RateLimiter`, kept in this process only (thread-safe).

    For a one-off command run without `REDIS_URL`: it keeps that command within the limit, but
    knows nothing of workers or other commands using the same API key.
    """

    def __init__(self, limit: RateLimit, *, margin: float | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.margin = max(0.1, 0.02 * limit.seconds) if margin is None else margin
        self._window = limit.seconds + self.margin
        self._grants: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self._sleep = sleep
        self._clock = clock

    def __repr__(self) -> str:
        return f"LocalRateLimiter(limit={self.limit})"

    def try_acquire(self, priority: bool = False) -> float:
        """Take a slot: 0.0 if taken (send now), else the seconds until one frees up (> 0). (One process
        has no competing callers to hold back: `priority` changes nothing here.)"""
        with self._lock:
            now = self._clock()
            while self._grants and self._grants[0] <= now - self._window:
                self._grants.popleft()
            if len(self._grants) < self.limit.count:
                self._grants.append(now)
                return 0.0
            return max(self._grants[0] + self._window - now, 1e-6)


def limiter_from_settings(settings) -> RateLimiter | LocalRateLimiter:
    """The Optimove limiter for `settings`: shared through Redis when `REDIS_URL` is set, else in-process.

    The Redis one uses the same key as the workers (a hash of `OPTIMOVE_API_KEY`), so a command
    and the workers share one budget. No connection is made until the first slot is taken.
    """
    if settings.redis_url:
        import redis

        settings.require("optimove_api_key")
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=3)
        return RateLimiter(client, settings.optimove_api_key, settings.optimove_rate_limit)
    return LocalRateLimiter(settings.optimove_rate_limit)
