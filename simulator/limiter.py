"""Sliding-window rate limiter for the fake Optimove, with exact after-the-fact statistics."""

from __future__ import annotations

import time
from bisect import bisect_right
from collections import deque
from datetime import datetime, timezone
from typing import Callable, Sequence


def max_in_window(timestamps: Sequence[float], window: float) -> int:
    """Largest number of timestamps lying within any half-open window of ``window`` seconds.

    ``timestamps`` must be sorted; two pointers, O(n).
    """
    best = left = 0
    for right, stamp in enumerate(timestamps):
        while stamp - timestamps[left] >= window:
            left += 1
        best = max(best, right - left + 1)
    return best


def _iso(stamp: float | None) -> str | None:
    return None if stamp is None else datetime.fromtimestamp(stamp, timezone.utc).isoformat()


class SlidingWindowLimiter:
    """Accepts at most ``limit`` requests per key in any ``window`` seconds.

    Only accepted requests enter the window. Every accepted timestamp is kept so the
    maximum per window can be computed exactly afterwards, and so is every attempt (accepted or
    not, including requests refused before reaching the window, see ``note_refused``): the most
    requests a client *sent* in any window shows whether it kept to the limit. Not thread-safe:
    callers lock.
    """

    def __init__(self, limit: int = 50, window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.window = window
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        """Forget every window and recorded timestamp."""
        self._recent: dict[str, deque] = {}
        self.accepted: list[float] = []
        self.attempted: list[float] = []
        self.wall_first: float | None = None
        self.wall_last: float | None = None

    def try_acquire(self, key: str) -> bool:
        """Record and return True if ``key`` may make a request now; False if over the limit."""
        now = self.clock()
        self.attempted.append(now)
        recent = self._recent.setdefault(key, deque())
        while recent and now - recent[0] >= self.window:
            recent.popleft()
        if len(recent) >= self.limit:
            return False
        recent.append(now)
        self.accepted.append(now)
        wall = time.time()
        self.wall_first = self.wall_first or wall
        self.wall_last = wall
        return True

    def note_refused(self) -> None:
        """Record an attempt refused before it reached the window (an injected 429)."""
        self.attempted.append(self.clock())

    def stats(self, since: float | None = None) -> dict:
        """Accepted count, exact max per window, first/last wall time and achieved rate.

        ``requests`` counts every attempt and ``max_requests_in_window`` is the most attempts in
        any window; ``clock_now`` is the limiter's clock, to pass back as ``since``: then the
        counts and maxima cover only requests after that clock time (the rest stays global).
        """
        accepted, attempted = self.accepted, self.attempted
        if since is not None:
            accepted = accepted[bisect_right(accepted, since):]
            attempted = attempted[bisect_right(attempted, since):]
        span = accepted[-1] - accepted[0] if len(accepted) > 1 else 0.0
        return {
            "accepted": len(accepted),
            "max_in_window": max_in_window(accepted, self.window),
            "requests": len(attempted),
            "max_requests_in_window": max_in_window(attempted, self.window),
            "clock_now": self.clock(),
            "window_seconds": self.window,
            "limit": self.limit,
            "achieved_rate_per_s": round(len(accepted) / span, 3) if span > 0 else 0.0,
            "first_at": _iso(self.wall_first),
            "last_at": _iso(self.wall_last),
        }
