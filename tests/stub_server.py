"""A scripted HTTP server on loopback for client tests: records requests and in-flight concurrency."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class StubServer:
    """`reply(request)` returns (status, headers, body bytes); `handle` may reshape both sides."""

    def __init__(self, path: str = "/"):
        self.requests: list[dict] = []
        self.reply = lambda req: (200, {}, b"")
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self):
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    parts = urlsplit(self.path)
                    req = {"method": self.command, "path": parts.path, "query": parse_qs(parts.query),
                           "headers": {k.lower(): v for k, v in self.headers.items()},
                           "body": self.rfile.read(length) if length else b""}
                    status, headers, body = server.handle(req)
                finally:
                    with server._lock:
                        server.in_flight -= 1
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _handle

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}{path}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def handle(self, req: dict) -> tuple[int, dict, bytes]:
        """Record the request and answer with `reply`."""
        with self._lock:
            self.requests.append(req)
        return self.reply(req)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
