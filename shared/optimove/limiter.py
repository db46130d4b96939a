"""One Optimove rate limit shared by every worker on every machine.

A sliding-window log kept in Redis: one sorted set per API key whose members are the grant
times (Redis server clock, microseconds). A Lua script trims, counts and adds atomically, so
at most `limit.count` grants fall in any window of `limit.seconds` seconds, whichever process
or machine asks. Using the server's `TIME` makes machines with skewed clocks agree.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from typing import Callable

from shared.settings import RateLimit, Secret

_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now, t[1] .. '-' .. t[2] .. ':' .. ARGV[3])
  redis.call('PEXPIRE', key, math.ceil(window / 1000) + 1)
  return {0, now}
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
local wait = tonumber(oldest[2]) + window - now
if wait < 1 then wait = 1 end
return {wait, now}
"""


def limiter_key(api_key: Secret, prefix: str = "relay:ratelimit") -> str:
    """The Redis key for `api_key`: a SHA-256 of the key, never the key itself."""
    return f"{prefix}:{hashlib.sha256(api_key.get().encode()).hexdigest()}"


class RateLimiter:
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

    def try_acquire_at(self) -> tuple[float, float]:
        """Like `try_acquire`, also returning the Redis server time (epoch seconds) of the attempt."""
        wait_us, now_us = self._script(keys=[self.key],
                                       args=[self.limit.count, self._window_us, uuid.uuid4().hex])
        return int(wait_us) / 1_000_000, int(now_us) / 1_000_000

    def try_acquire(self) -> float:
        """Take a slot: 0.0 if taken (send now), else the seconds until one frees up (> 0)."""
        return self.try_acquire_at()[0]

    def acquire(self, deadline_s: float) -> bool:
        """Wait (sleeping the returned waits, never spinning) up to `deadline_s` seconds from now for a slot."""
        end = self._clock() + deadline_s
        while True:
            wait = self.try_acquire()
            if wait == 0.0:
                return True
            if self._clock() + wait > end:
                return False
            self._sleep(wait)
