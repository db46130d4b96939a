"""RabbitMQ for the tests that run against both brokers (`broker` fixture, tests/conftest.py).

The RabbitMQ at `TEST_RABBITMQ_URL` (default amqp://guest:guest@127.0.0.1:5672) is used when it answers
and `rabbitmqctl` can manage it; each test then gets a fresh vhost (`relay-test-<random>`), deleted
afterwards. The server itself is never restarted or stopped. Otherwise a private server is started
for the session (Debian's `rabbitmq-server`, under a temporary folder, with its own epmd and ports)
and stopped at the end; when that fails too the RabbitMQ variants are skipped, saying why.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672"
HOW_TO = ("run a RabbitMQ on 127.0.0.1:5672 (guest/guest) manageable by rabbitmqctl as this user (root), "
          "set TEST_RABBITMQ_URL to another one, or install rabbitmq-server (apt-get install rabbitmq-server) "
          "so the tests start a private one")


class RabbitMQ:
    """A RabbitMQ server the tests may add vhosts to (through `rabbitmqctl`)."""

    def __init__(self, url: str, ctl: list[str], env: dict[str, str], private: bool = False):
        self.url = url.rstrip("/")
        self.ctl_argv = ctl
        self.env = env
        self.private = private

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run `rabbitmqctl ARGS` against this server; its output (raises CalledProcessError on failure)."""
        return subprocess.run([*self.ctl_argv, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=True, stdin=subprocess.DEVNULL).stdout

    def add_vhost(self) -> tuple[str, str]:
        """A new vhost with every permission for the URL's user: (name, broker URL)."""
        name = f"relay-test-{secrets.token_hex(6)}"
        user = urlsplit(self.url).username or "guest"
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        return name, f"{self.url}/{quote(name, safe='')}"

    def delete_vhost(self, name: str) -> None:
        """Delete a vhost made by `add_vhost` (its queues, messages and connections go with it)."""
        self.ctl("delete_vhost", name)

    def queues(self, vhost: str) -> dict[str, tuple[int, int]]:
        """(ready, unacknowledged) messages of each queue of `vhost`."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "-p", vhost,
                       "name", "messages_ready", "messages_unacknowledged")
        counts = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                counts[parts[0]] = (int(parts[1]), int(parts[2]))
        return counts


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _tool(name: str) -> str | None:
    """The real RabbitMQ script (Debian's /usr/sbin ones are wrappers that switch to the rabbitmq user)."""
    real = Path("/usr/lib/rabbitmq/bin") / name
    return str(real) if real.exists() else shutil.which(name)


def shared_server(url: str) -> tuple[RabbitMQ | None, str]:
    """The running server at `url` if it answers and rabbitmqctl manages it; else (None, why not)."""
    parts = urlsplit(url)
    if not _answers(parts.hostname or "127.0.0.1", parts.port or 5672):
        return None, f"nothing answers on {parts.hostname}:{parts.port or 5672}"
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return None, "rabbitmqctl is not installed"
    server = RabbitMQ(url, [ctl], _clean_env())
    try:
        server.ctl("list_vhosts", timeout=30)
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"rabbitmqctl cannot manage it ({_why(exc)})"
    return server, ""


def _why(exc: BaseException) -> str:
    text = getattr(exc, "stderr", None) or str(exc)
    return " ".join(str(text).split())[:300]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateServer:
    """A RabbitMQ node of this test session: own epmd, AMQP and distribution ports, data and logs in `base`."""

    def __init__(self, base: Path):
        self.base = base
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 90) -> RabbitMQ:
        server_bin, ctl_bin, epmd_bin = _tool("rabbitmq-server"), _tool("rabbitmqctl"), shutil.which("epmd")
        if not (server_bin and ctl_bin and epmd_bin):
            raise RuntimeError("rabbitmq-server, rabbitmqctl or epmd is not installed")
        self.base.mkdir(parents=True, exist_ok=True)
        port, dist_port, epmd_port = _free_port(), _free_port(), _free_port()
        node = f"relaytest{secrets.token_hex(3)}@localhost"
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{port}\nloopback_users.guest = true\n")
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / ".erlang.cookie").write_text(secrets.token_hex(16))
        (self.base / ".erlang.cookie").chmod(0o400)
        env = {**_clean_env(), "HOME": str(self.base), "ERL_EPMD_PORT": str(epmd_port),
               "ERL_EPMD_ADDRESS": "127.0.0.1",
               "RABBITMQ_NODENAME": node, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
               "RABBITMQ_NODE_PORT": str(port), "RABBITMQ_DIST_PORT": str(dist_port),
               "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"), "RABBITMQ_LOG_BASE": str(self.base / "log"),
               "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
               "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
               "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
               "RABBITMQ_PID_FILE": str(self.base / "rabbitmq.pid")}
        log = open(self.base / "server.out", "ab")
        self.procs.append(subprocess.Popen([epmd_bin, "-port", str(epmd_port), "-address", "127.0.0.1"],
                                           env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))
        self.procs.append(subprocess.Popen([server_bin], env=env, cwd=self.base, stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        server = RabbitMQ(f"amqp://guest:guest@127.0.0.1:{port}", [ctl_bin, "-n", node], env, private=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[-1].poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited ({self.procs[-1].returncode}): {self._tail()}")
            if _answers("127.0.0.1", port):
                try:
                    server.ctl("await_startup", timeout=max(5.0, deadline - time.monotonic()))
                    return server
                except (subprocess.SubprocessError, OSError):
                    pass
            time.sleep(0.5)
        raise RuntimeError(f"rabbitmq-server not up after {timeout:.0f}s: {self._tail()}")

    def _tail(self) -> str:
        try:
            return " ".join((self.base / "server.out").read_text(errors="replace")[-600:].split())
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the node and its epmd (their own process groups: nothing else is touched)."""
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        self.procs.clear()
