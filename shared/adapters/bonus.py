"""Bonus-system adapters: grant promo codes to customers in the operator's system.

Every grant carries an idempotency key derived from (campaign, customer, promo code), so a
retry after a crash is safe for a bonus system that honours it. Adapters answer one
`GrantResult` per item: `granted`, `rejected` (permanent, with a reason) or `retry`.
Built-ins: `http` (generic JSON over HTTP) and `fake` (in memory); others come from the
`relay.bonus_adapters` entry-point group.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

import requests
from requests.adapters import HTTPAdapter

from shared.redact import redact, response_text
from shared.settings import Secret

ENTRY_POINT_GROUP = "relay.bonus_adapters"
STATUSES = ("granted", "rejected", "retry")


@dataclass(frozen=True)
class GrantItem:
    """One promo code to grant to one customer."""

    idempotency_key: str
    campaign_id: int
    channel_id: int | None
    customer_id: str
    promo_code: str
    source: str

    def to_json(self) -> dict[str, Any]:
        """The item as the JSON object the bonus system receives (a flat `dataclasses.asdict`, much cheaper)."""
        return {"idempotency_key": self.idempotency_key, "campaign_id": self.campaign_id,
                "channel_id": self.channel_id, "customer_id": self.customer_id,
                "promo_code": self.promo_code, "source": self.source}


@dataclass(frozen=True)
class GrantResult:
    """The outcome for one item: `granted`, `rejected` or `retry`."""

    idempotency_key: str
    status: str
    reference: str | None = None
    reason: str | None = None


class BonusAdapter(Protocol):
    """What the grant machinery needs from a bonus system."""

    def grant(self, items: list[GrantItem]) -> list[GrantResult]:
        """Grant `items`; one result per item, in order, with the same keys."""
        ...

    def close(self) -> None:
        """Release connections and threads."""
        ...


def idempotency_key(campaign_id: int, customer_id: str, promo_code: str) -> str:
    """A stable key for (campaign, customer, promo code): `relay-` + 40 hex chars of a SHA-256."""
    raw = "\x1f".join((str(campaign_id), str(customer_id), str(promo_code)))
    return "relay-" + hashlib.sha256(raw.encode("utf-8")).hexdigest()[:40]


class HttpBonusAdapter:
    """Generic JSON-over-HTTP bonus system, in `batch` or `single` mode."""

    def __init__(self, url: str, mode: str = "batch", batch_size: int = 500, concurrency: int = 16,
                 timeout: float = 10.0, auth_header: Secret | None = None,
                 session: requests.Session | None = None):
        if mode not in ("batch", "single"):
            raise ValueError(f"bonus mode must be 'batch' or 'single', not {mode!r}")
        self.url = url
        self.mode = mode
        self.batch_size = max(1, batch_size)
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self._auth_header = auth_header
        self._headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if auth_header:
            name, _, value = auth_header.get().partition(":")
            self._headers[name.strip()] = value.strip()
        self._own_session = session is None
        self._session = session or self._new_session()
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> "HttpBonusAdapter":
        """An adapter configured by `BONUS_URL`, `BONUS_MODE`, `BONUS_BATCH_SIZE`, … ."""
        if not settings.bonus_url:
            raise ValueError("the http bonus adapter needs BONUS_URL")
        return cls(settings.bonus_url, settings.bonus_mode, settings.bonus_batch_size,
                   settings.bonus_concurrency, settings.bonus_timeout, settings.bonus_auth_header)

    def __repr__(self) -> str:
        return f"HttpBonusAdapter(url={self.url!r}, mode={self.mode!r})"

    def _new_session(self) -> requests.Session:
        session = requests.Session()
        pool = HTTPAdapter(pool_connections=4, pool_maxsize=self.concurrency)
        session.mount("http://", pool)
        session.mount("https://", pool)
        return session

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="bonus-http")
            return self._executor

    def _map(self, fn, jobs: list) -> list:
        if len(jobs) <= 1:
            return [fn(job) for job in jobs]
        return list(self._pool().map(fn, jobs))

    def grant(self, items: list[GrantItem]) -> list[GrantResult]:
        """Grant `items`: batch mode posts chunks of `batch_size`, single mode one call per item."""
        if self.mode == "single":
            return self._map(self._grant_one, list(items))
        chunks = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        return [result for chunk in self._map(self._grant_chunk, chunks) for result in chunk]

    def close(self) -> None:
        """Stop the worker threads and close the session if the adapter made it."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        if self._own_session:
            self._session.close()

    def _post(self, body: Any, headers: dict[str, str] | None = None) -> requests.Response | str:
        """The response, or a reason string when the call itself failed."""
        data = json.dumps(body, separators=(",", ":")).encode()
        try:
            return self._session.post(self.url, data=data, headers={**self._headers, **(headers or {})},
                                      timeout=self.timeout)
        except requests.Timeout:
            return f"timed out after {self.timeout:g}s"
        except requests.RequestException as exc:
            return self._redact(f"{type(exc).__name__}: {exc}")

    def _grant_chunk(self, chunk: list[GrantItem]) -> list[GrantResult]:
        response = self._post({"grants": [item.to_json() for item in chunk]})
        if isinstance(response, str):
            return [GrantResult(i.idempotency_key, "retry", reason=response) for i in chunk]
        status = response.status_code
        if not 200 <= status < 300:
            outcome = "retry" if _temporary(status) else "rejected"
            reason = f"HTTP {status}: {self._text(response)}"
            return [GrantResult(i.idempotency_key, outcome, reason=reason) for i in chunk]
        try:
            replies = json.loads(response.content)["results"]
            by_key = {r["idempotency_key"]: r for r in replies if isinstance(r, dict) and "idempotency_key" in r}
        except (ValueError, KeyError, TypeError):
            reason = f"HTTP {status}: reply is not {{\"results\": [...]}}: {self._text(response)}"
            return [GrantResult(i.idempotency_key, "retry", reason=reason) for i in chunk]
        return [self._from_reply(item, by_key.get(item.idempotency_key)) for item in chunk]

    def _from_reply(self, item: GrantItem, reply: dict | None) -> GrantResult:
        if reply is None:
            return GrantResult(item.idempotency_key, "retry", reason="no result in reply")
        status = reply.get("status")
        reference = _str_or_none(reply.get("reference"))
        reason = _str_or_none(reply.get("reason"))
        if status not in STATUSES:
            return GrantResult(item.idempotency_key, "retry", reference, f"unknown status {status!r}")
        return GrantResult(item.idempotency_key, status, reference, reason and self._redact(reason))

    def _grant_one(self, item: GrantItem) -> GrantResult:
        key = item.idempotency_key
        response = self._post(item.to_json(), {"Idempotency-Key": key})
        if isinstance(response, str):
            return GrantResult(key, "retry", reason=response)
        status = response.status_code
        if 200 <= status < 300 or status == 409:
            return GrantResult(key, "granted", _reference(response),
                               "already granted" if status == 409 else None)
        outcome = "retry" if _temporary(status) else "rejected"
        return GrantResult(key, outcome, reason=f"HTTP {status}: {self._text(response)}")

    def _secrets(self) -> tuple[str, ...]:
        if not self._auth_header:
            return ()
        return self._auth_header.get(), self._auth_header.get().partition(":")[2].strip()

    def _text(self, response: requests.Response) -> str:
        return response_text(response, self._secrets())

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets())


def _temporary(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _reference(response: requests.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return _str_or_none(body.get("reference")) if isinstance(body, dict) else None


class FakeBonusAdapter:
    """An in-memory bonus system for tests: honours idempotency keys, scriptable outcomes.

    `applied` maps key → item for every grant applied once; `calls` lists every `grant` batch.
    `reject_codes` maps promo code → reason; `script` is a queue of outcomes (a status or a
    `(status, reason)` pair) consumed one per item before the normal rules apply.
    """

    def __init__(self):
        self.applied: dict[str, GrantItem] = {}
        self.references: dict[str, str] = {}
        self.calls: list[list[GrantItem]] = []
        self.reject_codes: dict[str, str] = {}
        self.script: deque = deque()
        self.closed = False
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> "FakeBonusAdapter":
        """A fresh fake; `settings` is ignored."""
        return cls()

    def reject_code(self, promo_code: str, reason: str = "rejected by fake") -> None:
        """Reject every future grant of `promo_code` with `reason`."""
        self.reject_codes[promo_code] = reason

    def queue(self, *outcomes: str | tuple[str, str | None]) -> None:
        """Script the next outcomes, one per item, e.g. `queue("retry", ("rejected", "no"))`."""
        self.script.extend(outcomes)

    def grant(self, items: list[GrantItem]) -> list[GrantResult]:
        """Apply each item once per idempotency key; repeats answer `granted` with the first reference."""
        with self._lock:
            self.calls.append(list(items))
            return [self._grant_one(item) for item in items]

    def _grant_one(self, item: GrantItem) -> GrantResult:
        key = item.idempotency_key
        if self.script:
            scripted = self.script.popleft()
            status, reason = scripted if isinstance(scripted, tuple) else (scripted, None)
            if status != "granted":
                return GrantResult(key, status, reason=reason or f"scripted {status}")
        if key in self.applied:
            return GrantResult(key, "granted", self.references[key], "already granted")
        if item.promo_code in self.reject_codes:
            return GrantResult(key, "rejected", reason=self.reject_codes[item.promo_code])
        self.applied[key] = item
        self.references[key] = f"fake-{len(self.applied)}"
        return GrantResult(key, "granted", self.references[key])

    def close(self) -> None:
        """Mark the fake closed."""
        self.closed = True


_BUILTINS = {"http": HttpBonusAdapter.from_settings, "fake": FakeBonusAdapter.from_settings}


def load_bonus_adapter(settings) -> BonusAdapter:
    """The adapter named by `settings.bonus_adapter`: a built-in or a `relay.bonus_adapters` entry point.

    An entry point is a class or factory taking `settings` (a class with `from_settings` is built by it).
    """
    name = (settings.bonus_adapter or "").strip()
    if name in _BUILTINS:
        return _BUILTINS[name](settings)
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        available = ", ".join(sorted(set(_BUILTINS) | set(found)))
        raise ValueError(f"unknown bonus adapter {name!r} (BONUS_ADAPTER); available: {available}")
    target = found[name].load()
    return getattr(target, "from_settings", target)(settings)
