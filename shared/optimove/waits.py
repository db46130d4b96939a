"""How often, and for how long, the shared Optimove rate limiter made callers wait.

The limiter never sleeps in a worker: a caller that finds the window full gets the exact wait
and re-schedules its task. Each such refusal is added here, in Redis, so every process's waits
add up in one place that the admin page (`/admin`, `/api/overview`) can read:

- `<prefix>:waits`, a hash of totals since the Redis data began: `count`, `seconds` (the waits
  handed out, summed), `priority_count` (refusals of priority callers: conditional status
  reports), `max_seconds`, `last_at` (Redis server time, epoch seconds) and `last_seconds`;
- `<prefix>:waits:<epoch minute>`, the same `count` / `seconds` per minute, kept for two hours.

Recording is one pipelined round trip per refusal, and never fails the caller.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "relay:ratelimit"
MINUTE_TTL_S = 7200
# keeps the largest wait seen in one atomic step (HSET only when larger)
_MAX = """
local old = tonumber(redis.call('HGET', KEYS[1], 'max_seconds') or '0')
if tonumber(ARGV[1]) > old then redis.call('HSET', KEYS[1], 'max_seconds', ARGV[1]) end
return 0
"""


def waits_key(prefix: str = DEFAULT_PREFIX) -> str:
    """The hash of wait totals for a limiter whose keys start with `prefix`."""
    return f"{prefix}:waits"


def _prefix_of(limiter_key: str) -> str:
    """`relay:ratelimit:<sha256>` -> `relay:ratelimit`."""
    return limiter_key.rpartition(":")[0] or DEFAULT_PREFIX


def note_wait(client, limiter_key: str, wait_s: float, now_s: float, priority: bool = False) -> None:
    """Add one refusal of `wait_s` seconds (at Redis time `now_s`) to the totals of `limiter_key`'s limiter."""
    try:
        key = waits_key(_prefix_of(limiter_key))
        minute = f"{key}:{int(now_s // 60)}"
        wait = f"{wait_s:.6f}"
        pipe = client.pipeline(transaction=False)
        pipe.hincrby(key, "count", 1)
        pipe.hincrbyfloat(key, "seconds", wait)
        if priority:
            pipe.hincrby(key, "priority_count", 1)
        pipe.hset(key, mapping={"last_at": f"{now_s:.6f}", "last_seconds": wait})
        pipe.eval(_MAX, 1, key, wait)
        pipe.hincrby(minute, "count", 1)
        pipe.hincrbyfloat(minute, "seconds", wait)
        pipe.expire(minute, MINUTE_TTL_S)
        pipe.execute()
    except Exception as exc:  # statistics only: the caller's wait stands either way
        log.debug("rate-limit wait not recorded: %s", exc)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_waits(client, prefix: str = DEFAULT_PREFIX, minutes: int = 15) -> dict[str, Any]:
    """Totals, the last `minutes` minutes (by Redis server time) and the last wait.

    Keys: `count`, `seconds`, `priority_count`, `max_seconds`, `last_at` (epoch seconds or None),
    `last_seconds`, `recent_minutes`, `recent_count`, `recent_seconds`, `now` (Redis time, epoch seconds).
    """
    key = waits_key(prefix)
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(key)
    first = int(now // 60) - minutes + 1
    for minute in range(first, first + minutes):
        pipe.hgetall(f"{key}:{minute}")
    totals, *recent = pipe.execute()
    totals = {_text(k): _text(v) for k, v in totals.items()}

    def number(mapping: dict, name: str, kind=float):
        try:
            return kind(float(mapping[name])) if name in mapping else kind(0)
        except ValueError:
            return kind(0)

    recent = [{_text(k): _text(v) for k, v in m.items()} for m in recent]
    return {
        "count": number(totals, "count", int),
        "seconds": round(number(totals, "seconds"), 3),
        "priority_count": number(totals, "priority_count", int),
        "max_seconds": round(number(totals, "max_seconds"), 3),
        "last_at": number(totals, "last_at") or None,
        "last_seconds": round(number(totals, "last_seconds"), 3) if "last_seconds" in totals else None,
        "recent_minutes": minutes,
        "recent_count": sum(number(m, "count", int) for m in recent),
        "recent_seconds": round(sum(number(m, "seconds") for m in recent), 3),
        "now": now,
    }
