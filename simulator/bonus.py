"""Fake bonus system: batch and single grant endpoints, idempotency keys, injectable faults.

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
from dataclasses import asdict, dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from simulator.ledger import InvalidGrant, Ledger, parse_grant

MAX_BATCH = 10_000
RATE_FIELDS = ("failure_rate", "timeout_rate", "drop_after_apply_rate", "item_retry_rate")


class ConfigError(ValueError):
    """A fault setting is out of range or of the wrong type."""


@dataclass
class BonusConfig:
    """Fault settings of the fake bonus system; ``validated`` checks every field."""

    failure_rate: float = 0.0
    timeout_rate: float = 0.0
    drop_after_apply_rate: float = 0.0
    item_retry_rate: float = 0.0
    latency_ms: float = 0
    reject_codes: tuple = ()
    seed: int | None = None
    timeout_sleep_s: float = 15.0

    def validated(self) -> "BonusConfig":
        """Return self with normalised types, or raise ConfigError naming the bad setting."""
        for name in RATE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ConfigError(f"{name} must be a number in [0, 1]")
            setattr(self, name, float(value))
        for name in ("latency_ms", "timeout_sleep_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be a non-negative number")
        codes = self.reject_codes
        if isinstance(codes, str) or not all(isinstance(code, str) for code in codes):
            raise ConfigError("reject_codes must be a list of strings")
        self.reject_codes = tuple(codes)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError("seed must be an integer or null")
        return self

    def updated(self, changes: object) -> "BonusConfig":
        """A validated copy with ``changes`` (a dict of setting names) applied."""
        if not isinstance(changes, dict):
            raise ConfigError("config must be a JSON object")
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown settings: {sorted(unknown)}")
        return BonusConfig(**{**asdict(self), **changes}).validated()


@dataclass
class BonusApp:
    """State of one fake bonus system: config, ledger, seeded randomness and a lock."""

    config: BonusConfig
    ledger: Ledger = field(default_factory=Ledger)
    lock: threading.Lock = field(default_factory=threading.Lock)
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self):
        self.rng.seed(self.config.seed)

    def configure(self, changes: dict) -> None:
        """Change fault settings at runtime (reseeds when ``seed`` is given)."""
        with self.lock:
            self.config = self.config.updated(changes)
            if "seed" in changes:
                self.rng.seed(self.config.seed)

    def reset(self) -> None:
        """Forget every grant and counter; settings stay."""
        with self.lock:
            self.ledger = Ledger()

    def roll_call_fault(self, items: int) -> str | None:
        """Count a call and decide its fault: "timeout", "failure", "drop" or None."""
        with self.lock:
            self.ledger.calls += 1
            self.ledger.items_received += items
            for fault, rate in (("timeout", self.config.timeout_rate),
                                ("failure", self.config.failure_rate),
                                ("drop", self.config.drop_after_apply_rate)):
                if rate and self.rng.random() < rate:
                    self.ledger.faults_injected[fault] += 1
                    return fault
        return None

    def grant_batch(self, grants: list) -> list[dict]:
        """Apply a batch; items may come back "retry" when item_retry_rate is set."""
        results = []
        with self.lock:
            reject = frozenset(self.config.reject_codes)
            for grant in grants:
                if self.config.item_retry_rate and self.rng.random() < self.config.item_retry_rate:
                    self.ledger.faults_injected["item_retry"] += 1
                    results.append({"idempotency_key": grant.idempotency_key, "status": "retry",
                                    "reason": "temporarily unavailable"})
                else:
                    results.append(self.ledger.record(grant, reject)[0])
        return results

    def grant_one(self, grant) -> tuple[dict, bool]:
        """Apply one grant; return (stored result, is_new)."""
        with self.lock:
            return self.ledger.record(grant, frozenset(self.config.reject_codes))

    def summary(self, full: bool = False) -> dict:
        """The ledger counters under the lock."""
        with self.lock:
            return self.ledger.summary(full)

    def make_server(self, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
        """A threaded HTTP server bound to (host, port) serving this bonus system."""
        server = _BonusServer((host, port), _BonusHandler)
        server.app = self
        return server


def create_bonus_app(failure_rate: float = 0.0, timeout_rate: float = 0.0,
                     drop_after_apply_rate: float = 0.0, latency_ms: float = 0,
                     reject_codes=(), seed: int | None = None, timeout_sleep_s: float = 15.0,
                     item_retry_rate: float = 0.0) -> BonusApp:
    """Build a fake bonus system; call ``make_server(host, port)`` on the result to serve it."""
    config = BonusConfig(failure_rate=failure_rate, timeout_rate=timeout_rate,
                         drop_after_apply_rate=drop_after_apply_rate, item_retry_rate=item_retry_rate,
                         latency_ms=latency_ms, reject_codes=tuple(reject_codes), seed=seed,
                         timeout_sleep_s=timeout_sleep_s).validated()
    return BonusApp(config)


class _BonusServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    app: BonusApp

    def handle_error(self, request, client_address):
        """Ignore clients that hung up (they timed out by design); report anything else."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Refused(Exception):
    def __init__(self, status: int, body: dict):
        super().__init__(status)
        self.status, self.body = status, body


class _BonusHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _BonusServer

    def setup(self):
        """Disable Nagle: headers and body go out in separate writes on kept-alive connections."""
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):
        """Stay quiet: the benchmark sends a million grants."""

    def do_GET(self):
        """Serve ``GET /_sim/ledger[?full=1]``."""
        url = urlsplit(self.path)
        if url.path != "/_sim/ledger":
            return self._send(404, {"error": "not found"})
        full = parse_qs(url.query).get("full", ["0"])[0].lower() in ("1", "true", "yes")
        self._send(200, self.server.app.summary(full))

    def do_POST(self):
        """Dispatch the grant and admin endpoints."""
        routes = {
            "/bonus/grants": self._grants,
            "/bonus/grant": self._grant,
            "/_sim/reset": self._reset,
            "/_sim/config": self._config,
        }
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

    def _grants(self, body):
        items = body.get("grants") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise _Refused(400, {"error": "body must be {\"grants\": [...]}"})
        if len(items) > MAX_BATCH:
            raise _Refused(400, {"error": f"at most {MAX_BATCH} grants per call"})
        try:
            grants = [parse_grant(item) for item in items]
        except InvalidGrant as error:
            raise _Refused(400, {"error": str(error)}) from None
        app = self.server.app
        fault = self._before_apply(len(grants))
        results = app.grant_batch(grants)
        if fault == "drop":
            return self._drop()
        self._send(200, {"results": results})

    def _grant(self, body):
        try:
            grant = parse_grant(body, self.headers.get("Idempotency-Key"))
        except InvalidGrant as error:
            raise _Refused(400, {"reason": str(error)}) from None
        fault = self._before_apply(1)
        result, is_new = self.server.app.grant_one(grant)
        if fault == "drop":
            return self._drop()
        if result["status"] == "rejected":
            self._send(422, {"reason": result["reason"]})
        else:
            self._send(201 if is_new else 409, {"reference": result["reference"]})

    def _before_apply(self, items: int) -> str | None:
        app = self.server.app
        fault = app.roll_call_fault(items)
        if fault == "timeout":
            time.sleep(app.config.timeout_sleep_s)
            raise _Refused(503, {"error": "timed out upstream"})
        if fault == "failure":
            raise _Refused(503, {"error": "bonus system unavailable"})
        if app.config.latency_ms:
            time.sleep(app.config.latency_ms / 1000)
        return fault

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
