"""The Optimove API client: one keep-alive session, typed errors, the shared rate limit.

The client never sleeps or retries. A call that would break the rate limit raises
`RateLimited`; 429, 5xx and network trouble raise `TemporaryError`; other 4xx raise
`PermanentError`. The caller (a Celery task) decides when to try again, with `backoff`.
"""
from __future__ import annotations

import email.utils
import json
import logging
import random
import time
from typing import Any, Iterator, Mapping

import requests

from shared import metrics
from shared.optimove.limiter import RateLimiter
from shared.redact import redact, response_text
from shared.settings import Secret

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0


class OptimoveError(Exception):
    """Base of every error the client raises; `reason` is safe to log."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TemporaryError(OptimoveError):
    """Worth retrying later: 429, 5xx, timeouts, connection errors, an unreadable 200."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class RateLimited(TemporaryError):
    """The shared rate limit has no free slot; try again in `wait_seconds`."""

    def __init__(self, wait_seconds: float):
        super().__init__(f"rate limit reached, next slot in {wait_seconds:.3f}s", retry_after=wait_seconds)
        self.wait_seconds = wait_seconds


class Throttled(TemporaryError):
    """Optimove answered 429: its own window is full (another client of the key, or clock skew)."""


class PermanentError(OptimoveError):
    """Retrying will not help: 400, 401, 403, 404, 405 and other 4xx."""

    def __init__(self, reason: str, status: int | None):
        super().__init__(reason)
        self.status = status


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta seconds or HTTP-date), or None."""
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff(attempt: int, base: float = 1.0, cap: float = 60.0,
            retry_after: float | None = None, rng=random, floor: float = 0.0) -> float:
    """Seconds to wait before retry number `attempt` (0 = first retry): capped exponential, full jitter.

    `floor` (0..1) keeps the delay at least that fraction of the exponential ceiling, so a number
    of attempts is guaranteed to span a known time (0.5 is "equal jitter"). With `retry_after`
    the result is at least `retry_after`, even above `cap`, but never above 300 s.
    """
    ceiling = min(cap, base * 2 ** min(max(attempt, 0), 62))
    delay = rng.uniform(floor * ceiling, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, MAX_BACKOFF)


class OptimoveClient:
    """Calls `{base_url}/{category}/{function}` with `X-API-KEY`, mapping failures to typed errors."""

    def __init__(self, base_url: str, api_key: Secret, timeout: float = 30.0,
                 limiter: RateLimiter | None = None, session: requests.Session | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.limiter = limiter
        self._api_key = api_key
        self._session = session or requests.Session()
        self._headers = {"X-API-KEY": api_key.get(), "Accept": "application/json"}

    @classmethod
    def from_settings(cls, settings, limiter: RateLimiter | None = None) -> "OptimoveClient":
        """A client for `settings.optimove_api_url` / `optimove_api_key` / `optimove_timeout`."""
        settings.require("optimove_api_url", "optimove_api_key")
        return cls(settings.optimove_api_url, settings.optimove_api_key, settings.optimove_timeout, limiter)

    def __repr__(self) -> str:
        return f"OptimoveClient(base_url={self.base_url!r})"

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()

    def url(self, category: str, function: str) -> str:
        """The URL of `function` in `category` (category lower-cased, function as documented)."""
        return f"{self.base_url}/{category.lower()}/{function}"

    def get(self, category: str, function: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET a function; returns the decoded JSON (None for an empty 200)."""
        return self._call("GET", category, function, params, None)

    def post(self, category: str, function: str, body: Any, params: Mapping[str, Any] | None = None,
             priority: bool = False) -> Any:
        """POST `body` as JSON; returns the decoded JSON (None for an empty 200). A `priority` call (a
        status report racing a deadline) takes the next free rate-limit slot before ordinary calls."""
        return self._call("POST", category, function, params, body, priority)

    def fetch_page(self, category: str, function: str, params: Mapping[str, Any] | None,
                   skip: int, top: int) -> list[dict]:
        """One page of a customer-list function (`$top`/`$skip`); an empty reply is an empty page."""
        data = self.get(category, function, {**(params or {}), "$top": top, "$skip": skip})
        if data is None:
            return []
        if not isinstance(data, list):
            raise PermanentError(f"{function}: expected a JSON array, got {type(data).__name__}", 200)
        return data

    def iter_pages(self, category: str, function: str, params: Mapping[str, Any] | None,
                   page_size: int) -> Iterator[list[dict]]:
        """Yield non-empty pages until a short or empty one."""
        skip = 0
        while True:
            page = self.fetch_page(category, function, params, skip, page_size)
            if page:
                yield page
            if len(page) < page_size:
                return
            skip += len(page)

    def _call(self, method: str, category: str, function: str,
              params: Mapping[str, Any] | None, body: Any, priority: bool = False) -> Any:
        if self.limiter is not None:
            wait = self.limiter.try_acquire(priority) if priority else self.limiter.try_acquire()
            metrics.observe_limiter(wait)
            if wait > 0:
                raise RateLimited(wait)
        url = self.url(category, function)
        headers = dict(self._headers)
        data = None
        if method == "POST":
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        started = time.perf_counter()
        try:
            response = self._session.request(method, url, params=params, data=data,
                                             headers=headers, timeout=self.timeout)
        except requests.Timeout:
            metrics.observe_optimove_call(function, "timeout", time.perf_counter() - started)
            raise TemporaryError(f"{method} {function}: timed out after {self.timeout:g}s") from None
        except requests.RequestException as exc:
            metrics.observe_optimove_call(function, "connection_error", time.perf_counter() - started)
            raise TemporaryError(self._redact(f"{method} {function}: {type(exc).__name__}: {exc}")) from None
        metrics.observe_optimove_call(function, response.status_code, time.perf_counter() - started)
        log.debug("optimove %s %s -> %s", method, function, response.status_code)
        return self._decode(method, function, response)

    def _decode(self, method: str, function: str, response: requests.Response) -> Any:
        status = response.status_code
        what = f"{method} {function}: HTTP {status}"
        if 200 <= status < 300:
            if not response.content.strip():
                return None
            try:
                return response.json()
            except ValueError:
                raise TemporaryError(f"{what}: body is not JSON: {self._text(response)}") from None
        if status in (408, 429) or status >= 500:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            error = Throttled if status == 429 else TemporaryError
            raise error(f"{what}: {self._text(response)}", retry_after)
        raise PermanentError(f"{what}: {self._text(response)}", status)

    def _text(self, response: requests.Response) -> str:
        return response_text(response, (self._api_key.get(),))

    def _redact(self, text: str) -> str:
        return redact(text, (self._api_key.get(),))
