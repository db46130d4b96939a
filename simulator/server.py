"""Run the fake Optimove, bonus system and send service on loopback, in threads of one process."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from dataclasses import dataclass, field

from werkzeug.serving import make_server

from simulator.bonus import BONUS, create_bonus_app
from simulator.optimove import create_optimove_app
from simulator.peer import FakePeer
from simulator.send import SEND, create_send_app


def _endpoint(base_attribute: str, path: str, doc: str) -> property:
    """A property: ``path`` on the server whose base URL is in attribute ``base_attribute``."""
    return property(lambda self: getattr(self, base_attribute) + path, doc=doc)


@dataclass
class RunningSimulator:
    """The servers listening, each in its own thread; ``stop()`` shuts them down."""

    optimove_url: str
    bonus_admin_url: str
    bonus: FakePeer
    optimove_app: object
    send_admin_url: str = ""
    send: FakePeer | None = None
    _servers: list = field(default_factory=list)
    _threads: list = field(default_factory=list)

    bonus_url = _endpoint("bonus_admin_url", BONUS.batch_path, "Batch grant endpoint.")
    bonus_single_url = _endpoint("bonus_admin_url", BONUS.single_path, "Single grant endpoint.")
    bonus_revoke_url = _endpoint("bonus_admin_url", BONUS.revoke_batch_path, "Batch revoke endpoint.")
    bonus_revoke_single_url = _endpoint("bonus_admin_url", BONUS.revoke_single_path, "Single revoke endpoint.")
    send_url = _endpoint("send_admin_url", SEND.batch_path, "Batch send endpoint.")
    send_single_url = _endpoint("send_admin_url", SEND.single_path, "Single send endpoint.")

    def urls(self) -> dict:
        """The URLs written to the ready file."""
        return {
            "optimove_url": self.optimove_url,
            "bonus_url": self.bonus_url,
            "bonus_single_url": self.bonus_single_url,
            "bonus_revoke_url": self.bonus_revoke_url,
            "bonus_revoke_single_url": self.bonus_revoke_single_url,
            "bonus_admin_url": self.bonus_admin_url,
            "send_url": self.send_url,
            "send_single_url": self.send_single_url,
            "send_admin_url": self.send_admin_url,
            "pid": os.getpid(),
        }

    def stop(self) -> None:
        """Stop accepting requests and close the listening sockets."""
        for server in self._servers:
            server.shutdown()
        for server in self._servers:
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)


def start(optimove_port: int = 0, bonus_port: int = 0, api_key: str = "sim-key",
          host: str = "127.0.0.1", rate_limit: tuple[int, float] = (50, 10.0),
          send_port: int = 0, send_faults: dict | None = None, **bonus_faults) -> RunningSimulator:
    """Start the three servers in background threads (port 0 picks a free port) and return them.

    ``bonus_faults`` are BonusConfig settings, ``send_faults`` SendConfig settings.
    """
    optimove_app = create_optimove_app(api_key, rate_limit)
    bonus = create_bonus_app(**bonus_faults)
    send = create_send_app(**(send_faults or {}))
    optimove_server = make_server(host, optimove_port, optimove_app, threaded=True)
    bonus_server = bonus.make_server(host, bonus_port)
    send_server = send.make_server(host, send_port)
    running = RunningSimulator(
        optimove_url=f"http://{host}:{optimove_server.server_port}",
        bonus_admin_url=f"http://{host}:{bonus_server.server_address[1]}",
        bonus=bonus, optimove_app=optimove_app,
        send_admin_url=f"http://{host}:{send_server.server_address[1]}", send=send,
        _servers=[optimove_server, bonus_server, send_server])
    for name, server in (("sim-optimove", optimove_server), ("sim-bonus", bonus_server),
                         ("sim-send", send_server)):
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), name=name, daemon=True)
        thread.start()
        running._threads.append(thread)
    return running


def write_ready_file(path: str, content: dict) -> None:
    """Write JSON to ``path`` atomically (temporary file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ready-", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(content, handle)
    os.replace(tmp, path)


def serve(optimove_port: int, bonus_port: int, api_key: str, host: str = "127.0.0.1",
          ready_file: str | None = None, rate_limit: tuple[int, float] = (50, 10.0),
          send_port: int = 0, send_faults: dict | None = None, **bonus_faults) -> None:
    """Run the servers until SIGTERM or SIGINT, printing one line per server with its URL."""
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    running = start(optimove_port, bonus_port, api_key, host, rate_limit, send_port, send_faults,
                    **bonus_faults)
    try:
        print(f"fake Optimove listening on {running.optimove_url}", flush=True)
        print(f"fake bonus system listening on {running.bonus_admin_url} "
              f"(batch {running.bonus_url}, single {running.bonus_single_url}, "
              f"revokes {running.bonus_revoke_url})", flush=True)
        print(f"fake send service listening on {running.send_admin_url} "
              f"(batch {running.send_url}, single {running.send_single_url})", flush=True)
        if ready_file:
            write_ready_file(ready_file, running.urls())
        while not stopping.wait(0.5):
            pass
    finally:
        running.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
