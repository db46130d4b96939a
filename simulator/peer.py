"""Shared machinery of the fake peers (bonus system, send service).

A peer has batch and single endpoints with idempotency keys, injectable faults settable at
runtime, and a ledger to assert on. A ``PeerKind`` names a peer's paths and says how its
items are parsed, rejected and summarised; ``FakePeer`` holds the state of one peer. A kind
with a ``RevokeKind`` also takes revokes of applied items, with the same endpoints, faults and
idempotency (the bonus system's ``/bonus/revokes``).

Built on ``http.server`` rather than Flask because the drop-after-apply fault must close
the TCP connection without writing any HTTP response, which a WSGI app cannot do.
"""

from __future__ import annotations

import json
import random
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, ClassVar
from urllib.parse import parse_qs, urlsplit

from simulator.ledger import InvalidItem, Ledger

MAX_BATCH = 10_000
RATE_FIELDS = ("failure_rate", "timeout_rate", "drop_after_apply_rate", "item_retry_rate")


class ConfigError(ValueError):
    """A fault setting is out of range or of the wrong type."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class FaultConfig:
    """Fault settings of a fake peer; ``fault_config`` adds the list of values a peer rejects."""

    REJECT_FIELD: ClassVar[str] = ""
    REJECT_TYPE: ClassVar[type] = str

    failure_rate: float = 0.0
    timeout_rate: float = 0.0
    drop_after_apply_rate: float = 0.0
    item_retry_rate: float = 0.0
    latency_ms: float = 0
    seed: int | None = None
    timeout_sleep_s: float = 15.0

    def validated(self) -> "FaultConfig":
        """Return self with normalised types, or raise ConfigError naming the bad setting."""
        for name in RATE_FIELDS:
            value = getattr(self, name)
            if not _number(value) or not 0 <= value <= 1:
                raise ConfigError(f"{name} must be a number in [0, 1]")
            setattr(self, name, float(value))
        for name in ("latency_ms", "timeout_sleep_s"):
            value = getattr(self, name)
            if not _number(value) or value < 0:
                raise ConfigError(f"{name} must be a non-negative number")
        if self.REJECT_FIELD:
            values = getattr(self, self.REJECT_FIELD)
            wanted = self.REJECT_TYPE
            if not isinstance(values, (list, tuple)) or not all(
                    isinstance(value, wanted) and not isinstance(value, bool) for value in values):
                kind = "strings" if wanted is str else "integers"
                raise ConfigError(f"{self.REJECT_FIELD} must be a list of {kind}")
            setattr(self, self.REJECT_FIELD, tuple(values))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError("seed must be an integer or null")
        return self

    def updated(self, changes: object) -> "FaultConfig":
        """A validated copy with ``changes`` (a dict of setting names) applied."""
        if not isinstance(changes, dict):
            raise ConfigError("config must be a JSON object")
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown settings: {sorted(unknown)}")
        return type(self)(**{**asdict(self), **changes}).validated()

    def rejects(self) -> frozenset:
        """The values this peer rejects."""
        return frozenset(getattr(self, self.REJECT_FIELD)) if self.REJECT_FIELD else frozenset()


def fault_config(name: str, reject_field: str, reject_type: type) -> type[FaultConfig]:
    """A FaultConfig class with one more setting, ``reject_field``: a list of ``reject_type`` values
    whose items the peer rejects."""
    return make_dataclass(name, [(reject_field, tuple, field(default=()))], bases=(FaultConfig,),
                          namespace={"REJECT_FIELD": reject_field, "REJECT_TYPE": reject_type,
                                     "__doc__": f"Fault settings; items with a value in {reject_field} are rejected."})


@dataclass(frozen=True)
class RevokeKind:
    """Revokes of a peer's applied items: batch ``{path}/{item}s`` with ``{"{item}s": [...]}``, single
    ``{path}/{item}``; ``parse`` builds an item with ``idempotency_key``, ``target_key`` (the ledger
    key it revokes) and ``reference`` (the grant's, or None)."""

    item: str
    parse: Callable[[object, str | None], Any]


@dataclass(frozen=True)
class PeerKind:
    """What one kind of fake peer is: names, paths, how items are parsed, rejected and summarised.

    ``path`` and ``item`` give the endpoints: batch ``{path}/{item}s`` with the body
    ``{"{item}s": [...]}``, single ``{path}/{item}``. With ``timed`` the ledger checks items'
    due times (see ``simulator.ledger``).
    """

    name: str
    path: str
    item: str
    applied_status: str
    reference_prefix: str
    customer_index: int
    config: type[FaultConfig]
    parse: Callable[[object, str | None], Any]
    reject_reason: Callable[[Any, frozenset], str | None]
    summary_names: dict = field(default_factory=dict)
    full_extras: Callable[[list[dict]], dict] | None = None
    timed: bool = False
    revoke: RevokeKind | None = None

    @property
    def batch_path(self) -> str:
        """The batch endpoint's path."""
        return f"{self.path}/{self.item}s"

    @property
    def single_path(self) -> str:
        """The single endpoint's path."""
        return f"{self.path}/{self.item}"

    @property
    def revoke_batch_path(self) -> str | None:
        """The batch revoke endpoint's path (None when the peer takes no revokes)."""
        return f"{self.path}/{self.revoke.item}s" if self.revoke else None

    @property
    def revoke_single_path(self) -> str | None:
        """The single revoke endpoint's path (None when the peer takes no revokes)."""
        return f"{self.path}/{self.revoke.item}" if self.revoke else None


@dataclass
class FakePeer:
    """State of one fake peer: its kind, config, ledger, seeded randomness and a lock."""

    kind: PeerKind
    config: FaultConfig
    ledger: Ledger | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self):
        self.rng.seed(self.config.seed)
        if self.ledger is None:
            self.ledger = self._new_ledger()

    @classmethod
    def build(cls, kind: PeerKind, **settings) -> "FakePeer":
        """A peer of ``kind`` with the given fault settings (validated); ``make_server`` serves it."""
        return cls(kind, kind.config(**settings).validated())

    def _new_ledger(self) -> Ledger:
        return Ledger(self.kind.reference_prefix, self.kind.applied_status, self.kind.timed,
                      revocable=self.kind.revoke is not None)

    def configure(self, changes: dict) -> None:
        """Change fault settings at runtime (reseeds when ``seed`` is given)."""
        with self.lock:
            self.config = self.config.updated(changes)
            if "seed" in changes:
                self.rng.seed(self.config.seed)

    def reset(self) -> None:
        """Forget every item and counter; settings stay."""
        with self.lock:
            self.ledger = self._new_ledger()

    def receive(self, items: list, now: float | None = None, revokes: bool = False) -> str | None:
        """Note a call's arrival at ``now`` (a call of revokes with ``revokes``), then decide its
        fault: "timeout", "failure", "drop" or None."""
        now = time.time() if now is None else now
        with self.lock:
            if revokes:
                self.ledger.receive_revokes(items, now)
            else:
                self.ledger.receive(items, now)
            for fault, rate in (("timeout", self.config.timeout_rate),
                                ("failure", self.config.failure_rate),
                                ("drop", self.config.drop_after_apply_rate)):
                if rate and self.rng.random() < rate:
                    self.ledger.faults_injected[fault] += 1
                    return fault
        return None

    def apply_batch(self, items: list, received_at: float | None = None, revokes: bool = False) -> list[dict]:
        """Apply a batch (of revokes, with ``revokes``) that arrived at ``received_at``; items may come
        back "retry" when item_retry_rate is set."""
        results = []
        with self.lock:
            rejects = self.config.rejects()
            retry_rate = self.config.item_retry_rate
            for item in items:
                if retry_rate and self.rng.random() < retry_rate:
                    self.ledger.faults_injected["item_retry"] += 1
                    results.append({"idempotency_key": item.idempotency_key, "status": "retry",
                                    "reason": "temporarily unavailable"})
                elif revokes:
                    results.append(self.ledger.revoke(item, received_at)[0])
                else:
                    reason = self.kind.reject_reason(item, rejects)
                    results.append(self.ledger.record(item, reason, received_at)[0])
        return results

    def apply_one(self, item, received_at: float | None = None, revokes: bool = False) -> tuple[dict, bool]:
        """Apply one item (a revoke, with ``revokes``) that arrived at ``received_at``; return
        (stored result, is_new)."""
        with self.lock:
            if revokes:
                return self.ledger.revoke(item, received_at)
            reason = self.kind.reject_reason(item, self.config.rejects())
            return self.ledger.record(item, reason, received_at)

    def summary(self, full: bool = False, campaign_id: int | None = None,
                customer_prefix: str | None = None) -> dict:
        """The ledger counters; with ``full`` also ``entries`` (filtered by campaign and prefix)."""
        kind = self.kind
        with self.lock:
            counters = self.ledger.counters()
            selected = list(self.ledger.select(campaign_id, customer_prefix, kind.customer_index)) if full else []
        summary = {kind.summary_names.get(name, name): value for name, value in counters.items()}
        if full:
            revocable = kind.revoke is not None
            summary["entries"] = [entry.to_json(key, revocable) for key, entry in selected]
            if kind.full_extras:
                summary.update(kind.full_extras(summary["entries"]))
        return summary

    def make_server(self, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
        """A threaded HTTP server bound to (host, port) serving this peer."""
        server = _PeerServer((host, port), _PeerHandler)
        server.app = self
        return server


class _PeerServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    app: FakePeer

    def handle_error(self, request, client_address):
        """Ignore clients that hung up (they timed out by design); report anything else."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Refused(Exception):
    def __init__(self, status: int, body: dict):
        super().__init__(status)
        self.status, self.body = status, body


class _PeerHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _PeerServer

    def setup(self):
        """Disable Nagle: headers and body go out in separate writes on kept-alive connections."""
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):
        """Stay quiet: the benchmark sends a million grants."""

    def do_GET(self):
        """Serve ``GET /_sim/ledger[?full=1][&campaign_id=C][&customer_prefix=P]``."""
        url = urlsplit(self.path)
        if url.path != "/_sim/ledger":
            return self._send(404, {"error": "not found"})
        query = {name: values[0] for name, values in parse_qs(url.query).items()}
        campaign_id = query.get("campaign_id")
        if campaign_id is not None and not campaign_id.isdigit():
            return self._send(400, {"error": "campaign_id must be an integer"})
        full = query.get("full", "0").lower() in ("1", "true", "yes")
        self._send(200, self.server.app.summary(full, int(campaign_id) if campaign_id else None,
                                                query.get("customer_prefix")))

    def do_POST(self):
        """Dispatch the item and admin endpoints."""
        kind = self.server.app.kind
        routes = {
            kind.batch_path: self._batch,
            kind.single_path: self._single,
            "/_sim/reset": self._reset,
            "/_sim/config": self._config,
        }
        if kind.revoke:
            routes[kind.revoke_batch_path] = lambda body: self._batch(body, revokes=True)
            routes[kind.revoke_single_path] = lambda body: self._single(body, revokes=True)
        route = routes.get(urlsplit(self.path).path)
        try:
            if route is None:
                raise _Refused(404, {"error": "not found"})
            route(self._read_json())
        except _Refused as refused:
            self._send(refused.status, refused.body)

    def _read_json(self):
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise _Refused(411, {"error": "Content-Length required"})
        raw = self.rfile.read(int(length)) if int(length) else b""
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            raise _Refused(400, {"error": "body is not valid JSON"}) from None

    def _parser(self, revokes: bool) -> tuple[str, Callable]:
        kind = self.server.app.kind
        return (kind.revoke.item, kind.revoke.parse) if revokes else (kind.item, kind.parse)

    def _batch(self, body, revokes: bool = False):
        app = self.server.app
        item_name, parse = self._parser(revokes)
        plural = f"{item_name}s"
        raw_items = body.get(plural) if isinstance(body, dict) else None
        if not isinstance(raw_items, list):
            raise _Refused(400, {"error": f"body must be {{\"{plural}\": [...]}}"})
        if len(raw_items) > MAX_BATCH:
            raise _Refused(400, {"error": f"at most {MAX_BATCH} {plural} per call"})
        try:
            items = [parse(raw, None) for raw in raw_items]
        except InvalidItem as error:
            raise _Refused(400, {"error": str(error)}) from None
        fault, received_at = self._before_apply(items, revokes)
        results = app.apply_batch(items, received_at, revokes)
        if fault == "drop":
            return self._drop()
        self._send(200, {"results": results})

    def _single(self, body, revokes: bool = False):
        app = self.server.app
        try:
            item = self._parser(revokes)[1](body, self.headers.get("Idempotency-Key"))
        except InvalidItem as error:
            raise _Refused(400, {"reason": str(error)}) from None
        fault, received_at = self._before_apply([item], revokes)
        result, is_new = app.apply_one(item, received_at, revokes)
        if fault == "drop":
            return self._drop()
        if result["status"] == "rejected":
            self._send(422, {"reason": result["reason"]})
        else:
            self._send(201 if is_new else 409, {"reference": result["reference"]})

    def _before_apply(self, items: list, revokes: bool = False) -> tuple[str | None, float]:
        app = self.server.app
        received_at = time.time()
        fault = app.receive(items, received_at, revokes)
        if fault == "timeout":
            time.sleep(app.config.timeout_sleep_s)
            raise _Refused(503, {"error": "timed out upstream"})
        if fault == "failure":
            raise _Refused(503, {"error": f"{app.kind.name} unavailable"})
        if app.config.latency_ms:
            time.sleep(app.config.latency_ms / 1000)
        return fault, received_at

    def _drop(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _reset(self, body):
        self.server.app.reset()
        self._send(200, {"reset": True})

    def _config(self, body):
        try:
            self.server.app.configure(body)
        except ConfigError as error:
            raise _Refused(400, {"error": str(error)}) from None
        self._send(200, {"config": asdict(self.server.app.config)})

    def _send(self, status: int, body: dict):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
