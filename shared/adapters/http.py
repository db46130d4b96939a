"""Machinery shared by the delivery adapters (bonus grants, platform sends).

`HttpAdapter` is a generic JSON-over-HTTP client in `batch` or `single` mode; a subclass names its
batch envelope, its success status, the statuses a batch reply may carry and its settings prefix.
`FakeAdapter` is its in-memory counterpart for tests. Both answer one `ItemResult` per item: the
success status, `rejected` (permanent, with a reason) or `retry`. `load_adapter` picks an adapter
by name among built-ins and an entry-point group.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Protocol

import requests
from requests.adapters import HTTPAdapter

from shared import metrics
from shared.redact import redact, response_text
from shared.settings import Secret

MODES = ("batch", "single")


@dataclass(frozen=True)
class ItemResult:
    """The outcome for one item: the adapter's success status, `rejected` or `retry`."""

    idempotency_key: str
    status: str
    reference: str | None = None
    reason: str | None = None


class Item(Protocol):
    """What an adapter delivers: a stable idempotency key and a JSON object."""

    @property
    def idempotency_key(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


class HttpAdapter:
    """Generic JSON-over-HTTP delivery, in `batch` or `single` mode.

    Subclasses set `prefix` (`bonus` reads `BONUS_URL`, `BONUS_MODE`, …), `envelope` (the batch
    body's key), `success` (the status of a delivered item) and `statuses` (allowed in a batch reply).
    """

    prefix: str
    envelope: str
    success: str
    statuses: tuple[str, ...]
    metrics_name: str | None = None  # the `adapter` label of its call metrics (default: `prefix`)

    def __init__(self, url: str, mode: str = "batch", batch_size: int = 500, concurrency: int = 16,
                 timeout: float = 10.0, auth_header: Secret | None = None,
                 session: requests.Session | None = None):
        if mode not in MODES:
            raise ValueError(f"{self.prefix} mode must be 'batch' or 'single', not {mode!r}")
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
    def from_settings(cls, settings):
        """An adapter configured by `<PREFIX>_URL`, `<PREFIX>_MODE`, `<PREFIX>_BATCH_SIZE`, … ."""
        def setting(name: str) -> Any:
            return getattr(settings, f"{cls.prefix}_{name}")
        if not setting("url"):
            raise ValueError(f"the http {cls.prefix} adapter needs {cls.prefix.upper()}_URL")
        return cls(setting("url"), setting("mode"), setting("batch_size"), setting("concurrency"),
                   setting("timeout"), setting("auth_header"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, mode={self.mode!r})"

    def _new_session(self) -> requests.Session:
        session = requests.Session()
        pool = HTTPAdapter(pool_connections=4, pool_maxsize=self.concurrency)
        session.mount("http://", pool)
        session.mount("https://", pool)
        return session

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"{self.prefix}-http")
            return self._executor

    def _map(self, fn, jobs: list) -> list:
        if len(jobs) <= 1:
            return [fn(job) for job in jobs]
        return list(self._pool().map(fn, jobs))

    def deliver(self, items: list[Item]) -> list[ItemResult]:
        """Deliver `items`: batch mode posts chunks of `batch_size`, single mode one call per item."""
        if self.mode == "single":
            return self._map(self._deliver_one, list(items))
        chunks = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        return [result for chunk in self._map(self._deliver_chunk, chunks) for result in chunk]

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
        adapter, started = self.metrics_name or self.prefix, time.perf_counter()
        try:
            response = self._session.post(self.url, data=data, headers={**self._headers, **(headers or {})},
                                          timeout=self.timeout)
        except requests.Timeout:
            metrics.observe_adapter_call(adapter, "timeout", time.perf_counter() - started)
            return f"timed out after {self.timeout:g}s"
        except requests.RequestException as exc:
            metrics.observe_adapter_call(adapter, "connection_error", time.perf_counter() - started)
            return self._redact(f"{type(exc).__name__}: {exc}")
        metrics.observe_adapter_call(adapter, response.status_code, time.perf_counter() - started)
        return response

    def _deliver_chunk(self, chunk: list[Item]) -> list[ItemResult]:
        response = self._post({self.envelope: [item.to_json() for item in chunk]})
        if isinstance(response, str):
            return [ItemResult(i.idempotency_key, "retry", reason=response) for i in chunk]
        status = response.status_code
        if not 200 <= status < 300:
            outcome = "retry" if _temporary(status) else "rejected"
            reason = f"HTTP {status}: {self._text(response)}"
            return [ItemResult(i.idempotency_key, outcome, reason=reason) for i in chunk]
        try:
            replies = json.loads(response.content)["results"]
            by_key = {r["idempotency_key"]: r for r in replies if isinstance(r, dict) and "idempotency_key" in r}
        except (ValueError, KeyError, TypeError):
            reason = f"HTTP {status}: reply is not {{\"results\": [...]}}: {self._text(response)}"
            return [ItemResult(i.idempotency_key, "retry", reason=reason) for i in chunk]
        return [self._from_reply(item, by_key.get(item.idempotency_key)) for item in chunk]

    def _from_reply(self, item: Item, reply: dict | None) -> ItemResult:
        if reply is None:
            return ItemResult(item.idempotency_key, "retry", reason="no result in reply")
        status = reply.get("status")
        reference = _str_or_none(reply.get("reference"))
        reason = _str_or_none(reply.get("reason"))
        if status not in self.statuses:
            return ItemResult(item.idempotency_key, "retry", reference, f"unknown status {status!r}")
        return ItemResult(item.idempotency_key, status, reference, reason and self._redact(reason))

    def _deliver_one(self, item: Item) -> ItemResult:
        key = item.idempotency_key
        response = self._post(item.to_json(), {"Idempotency-Key": key})
        if isinstance(response, str):
            return ItemResult(key, "retry", reason=response)
        status = response.status_code
        if 200 <= status < 300 or status == 409:
            return ItemResult(key, self.success, _reference(response),
                              f"already {self.success}" if status == 409 else None)
        outcome = "retry" if _temporary(status) else "rejected"
        return ItemResult(key, outcome, reason=f"HTTP {status}: {self._text(response)}")

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


class FakeAdapter:
    """An in-memory counterpart of `HttpAdapter` for tests: honours idempotency keys, scriptable outcomes.

    `applied` maps key → item for every item applied once; `calls` lists every batch. `rejections`
    maps a value of the item field named by `reject_by` → reason. `script` is a queue of outcomes (a
    status or a `(status, reason)` pair) consumed one per item before the normal rules apply.
    Subclasses set `success` and `reject_by`.
    """

    success: str
    reject_by: str

    def __init__(self):
        self.applied: dict[str, Item] = {}
        self.references: dict[str, str] = {}
        self.calls: list[list[Item]] = []
        self.script: deque = deque()
        self.rejections: dict[Any, str] = {}
        self.closed = False
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings):
        """A fresh fake; `settings` is ignored."""
        return cls()

    def reject(self, value: Any, reason: str = "rejected by fake") -> None:
        """Reject every future item whose `reject_by` field equals `value`, with `reason`."""
        self.rejections[value] = reason

    def queue(self, *outcomes: str | tuple[str, str | None]) -> None:
        """Script the next outcomes, one per item, e.g. `queue("retry", ("rejected", "no"))`."""
        self.script.extend(outcomes)

    def deliver(self, items: list[Item]) -> list[ItemResult]:
        """Apply each item once per idempotency key; repeats answer success with the first reference."""
        with self._lock:
            self.calls.append(list(items))
            return [self._deliver_one(item) for item in items]

    def _deliver_one(self, item: Item) -> ItemResult:
        key = item.idempotency_key
        if self.script:
            scripted = self.script.popleft()
            status, reason = scripted if isinstance(scripted, tuple) else (scripted, None)
            if status != self.success:
                return ItemResult(key, status, reason=reason or f"scripted {status}")
        if key in self.applied:
            return ItemResult(key, self.success, self.references[key], f"already {self.success}")
        rejection = self.rejections.get(getattr(item, self.reject_by))
        if rejection is not None:
            return ItemResult(key, "rejected", reason=rejection)
        self.applied[key] = item
        self.references[key] = f"fake-{len(self.applied)}"
        return ItemResult(key, self.success, self.references[key])

    def close(self) -> None:
        """Mark the fake closed."""
        self.closed = True


def load_adapter(name: str | None, builtins: dict[str, Callable[[Any], Any]], group: str, variable: str,
                 settings) -> Any:
    """The adapter called `name`: a built-in factory or an entry point of `group`, built with `settings`.

    An entry point is a class or factory taking `settings` (a class with `from_settings` is built by
    it). An unknown name raises `ValueError` naming `variable` and every available name.
    """
    name = (name or "").strip()
    if name in builtins:
        return builtins[name](settings)
    found = {ep.name: ep for ep in entry_points(group=group)}
    if name not in found:
        kind = variable.removesuffix("_ADAPTER").lower()
        available = ", ".join(sorted(set(builtins) | set(found)))
        raise ValueError(f"unknown {kind} adapter {name!r} ({variable}); available: {available}")
    target = found[name].load()
    return getattr(target, "from_settings", target)(settings)
