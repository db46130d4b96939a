"""`relay up`: start the stores (embedded when no URLs are set), migrate, run every process, stop them all.

Children run in their own sessions so a stop can take down each whole process tree; their output
is prefixed and coloured. Ctrl-C, SIGTERM or a closed terminal (SIGHUP) stops every child and every
server this started. Nothing outlives `relay up`, however it ends: a reaper process (`cli.reaper`)
holds a pipe from it and, when the pipe closes without a clean stop (SIGKILL, a crash), stops every
child group and the embedded Postgres. The data folder is locked while a `relay up` uses it, and a
busy web port is reported before anything starts (exit 2 for both). Output written to a closed
pipe (`relay up | head`) is dropped, never allowed to interrupt a stop.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import requests

from cli.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, wait_for_port
from shared.dispatch import CAMPAIGN_QUEUES, REALTIME
from shared.settings import Settings

# Real-time tasks are short. Four solo workers (each runs its task in its own main thread, then
# fetches the next message) rather than threads: with a thread pool a worker's event-loop thread
# fetches and acknowledges every message, and under a campaign it fought the task threads for the
# GIL while messages waited in Redis (bench/realtime.py, p99 under a campaign: 2 x 4 threads
# 189 ms to 1.1 s; 4 x solo 111-327 ms, three runs of four under 120 ms).
REALTIME_POOL = ["--pool", "solo", "--concurrency", "1"]
REALTIME_PROCESSES = 4
WORKER_METRICS_PORT = 9400  # the first worker's metrics port under `relay up` (RELAY_WORKER_METRICS_PORT unset)

COLOURS = {"web": 32, "worker": 34, "realtime": 94, "beat": 35, "flower": 36, "simulator": 33, "relay": 1}

# The channels of the simulator's demo (used when RELAY_CHANNEL_CONFIG is unset): the campaign
# driver's bonus channels, and a bonus and a send channel for real-time triggers.
DEMO_CHANNELS = {"default_role": "bonus", "conditional": True, "channels": {
    "504": {"role": "bonus"}, "505": {"role": "bonus"}, "506": {"role": "bonus"},
    "600": {"role": "bonus", "events": [11]}, "610": {"role": "send", "events": [13, 11], "attributes": ["Email", "Country"]}}}


_output_lock = threading.Lock()
_output_closed = False


def say(name: str, line: str) -> None:
    """Print one prefixed (and, on a terminal, coloured) line; once stdout is gone, drop output silently."""
    global _output_closed
    colour = COLOURS.get(name.rstrip("0123456789"), 37)
    prefix = f"{name:<9}|"
    with _output_lock:
        if _output_closed:
            return
        try:
            if sys.stdout.isatty():
                prefix = f"\033[{colour}m{prefix}\033[0m"
            sys.stdout.write(f"{prefix} {line.rstrip()}\n")
            sys.stdout.flush()
        except (OSError, ValueError):  # a closed pipe (`relay up | head`, a closed terminal)
            _output_closed = True
            try:  # later writes, including the interpreter's own flush at exit, go nowhere
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass


def lower_priority(nice: int) -> None:
    """Run at `nice`, also against other sessions: with autogroup scheduling (the Linux default) each
    session is one scheduling group and a process's nice only ranks it inside its session, so the
    session's group gets the same nice (bench/receiver.py: a niced worker session took its full
    share of the CPU from web until its autogroup was niced too)."""
    os.nice(nice)
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:  # no autogroup scheduling here: the plain nice value is what counts
        pass


NICED_BACKENDS = """
    SELECT pid, substring(application_name from '-nice([0-9]+)$')::int FROM pg_stat_activity
    WHERE application_name ~ '^relay-[0-9]+-nice[0-9]+$'"""


def nice_backends(conn, done: set[int]) -> int:
    """Give each backend of the embedded Postgres that serves a niced relay process (its
    `application_name` ends in `-nice<N>`, `shared.db.application_name`) that niceness; return how
    many were changed. Postgres runs in a session of its own, so its backends share one autogroup
    and a backend's nice ranks it among them: the campaign worker's queries yield to the
    listener's, which otherwise wait behind them (bench/receiver.py --mode busy). `done` holds the
    pids already set (a pid that ended is dropped from it). Only for a Postgres on this machine."""
    with conn.cursor() as cur:
        cur.execute(NICED_BACKENDS)
        rows = cur.fetchall()
    live = {pid for pid, _ in rows}
    done &= live
    changed = 0
    for pid, nice in rows:
        if pid in done:
            continue
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
            changed += 1
        except (ProcessLookupError, PermissionError):
            pass
        done.add(pid)
    return changed


class UpError(Exception):
    """`relay up` cannot start; the message says why (exit code 2)."""


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    pump: threading.Thread | None = field(default=None, repr=False)
    nice: int = 0  # added to the CPU niceness before exec, so a forked pool inherits it

    def start(self, env: dict[str, str]) -> None:
        nice = self.nice
        self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
                                     preexec_fn=(lambda: lower_priority(nice)) if nice else None)
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            say(self.name, line)

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def load_secrets(data_dir: Path) -> dict[str, str]:
    """Generated secrets of this data folder (listener token, admin password, simulator key), kept for reuse."""
    path = data_dir / "secrets.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    for key in ("listener_token", "admin_password", "simulator_api_key"):
        current.setdefault(key, secrets.token_urlsafe(24))
    path.write_text(json.dumps(current))
    path.chmod(0o600)
    return current


class Supervisor:
    """Owns the stores and children of one `relay up`."""

    def __init__(self, settings: Settings, data_dir: Path, port: int, flower_port: int, workers: int,
                 simulator: bool | None, worker_nice: int = 10):
        self.settings = settings
        # on a small machine the listener must answer while a campaign keeps every core busy: the
        # campaign worker, beat, Flower and the simulator run at a lower CPU priority than web and
        # the real-time workers (bench/receiver.py --busy measures it)
        self.worker_nice = worker_nice
        self.data_dir = data_dir.absolute()
        self.port = port
        self.flower_port = flower_port
        self.workers = workers
        self.attach_simulator = (not settings.optimove_api_url) if simulator is None else simulator
        self.pg: EmbeddedPostgres | None = None
        self._nice_conn = None
        self._nice_next = 0.0
        self._niced: set[int] = set()
        self.redis: EmbeddedRedis | None = None
        self.children: list[Child] = []
        self.worker_metrics: dict[str, int] = {}  # worker child -> its metrics port
        self.stopping = threading.Event()

    def run(self) -> int:
        """Start everything, wait for a stop signal or a dead child, stop everything; return the exit code."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            self._claim_data_dir()
            self._check_port()
        except UpError as exc:
            say("relay", str(exc))
            return 2
        code = 0
        try:
            self._stop_stale_children()
            self._start_reaper()
            self._start()
            while not self.stopping.wait(0.5):
                self._nice_backends()
                dead = [c for c in self.children if c.proc.poll() is not None]
                if dead:
                    say("relay", f"{dead[0].name} exited with code {dead[0].proc.returncode}; stopping everything")
                    code = 1
                    break
        except Exception as exc:
            say("relay", f"start failed: {exc}")
            code = 1
        finally:
            self._stop()
            self._release_reaper()
        return code

    # -- what keeps two `relay up` apart and leaves nothing behind -----------------------------

    def _claim_data_dir(self) -> None:
        """Lock the data folder for this `relay up` (released by the kernel however the process ends)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.data_dir / "up.lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "unknown"
            raise UpError(f"the data folder {self.data_dir} is in use by another `relay up` (pid {holder}); "
                          "stop that one first, or give this one its own --data-dir") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()

    def _check_port(self) -> None:
        """The web port must be free before anything starts."""
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", self.port))
            except OSError as exc:
                raise UpError(f"port {self.port} (the web listener, --port) is in use on 127.0.0.1 "
                              f"({exc.strerror}); stop what uses it or choose another with --port") from None

    def _stop_stale_children(self) -> None:
        """Stop the children a crashed `relay up` of this folder left behind, if any are still running."""
        path = self.data_dir / "children.json"
        if not path.exists():
            return
        import psutil

        for entry in json.loads(path.read_text() or "[]"):
            try:
                leader = psutil.Process(entry["pgid"])
                if leader.create_time() != entry["created"]:
                    continue  # the pid was reused by something else
            except psutil.Error:
                continue
            say("relay", f"stopping {entry['name']} (pid {entry['pgid']}) left running by an earlier relay up")
            from cli.reaper import reap

            reap([entry["pgid"]], [], grace=10)
        path.unlink()

    def _start_reaper(self) -> None:
        self._reaper = subprocess.Popen([sys.executable, "-m", "cli.reaper"], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                                        start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent))
        self._children_file: list[dict] = []

    def _tell_reaper(self, message: dict) -> None:
        try:
            self._reaper.stdin.write(json.dumps(message) + "\n")
            self._reaper.stdin.flush()
        except (OSError, ValueError):
            say("relay", "the reaper is gone: stop with Ctrl-C so nothing is left running")

    def _started(self, child: "Child") -> None:
        """Record a started child's group with the reaper and in children.json (for a later start)."""
        import psutil

        self._tell_reaper({"group": child.proc.pid})
        try:
            created = psutil.Process(child.proc.pid).create_time()
        except psutil.Error:
            return
        self._children_file.append({"name": child.name, "pgid": child.proc.pid, "created": created})
        (self.data_dir / "children.json").write_text(json.dumps(self._children_file))

    def _release_reaper(self) -> None:
        """Everything stopped cleanly: the reaper has nothing to do."""
        reaper = getattr(self, "_reaper", None)
        if reaper is None:
            return
        self._tell_reaper({"done": True})
        try:
            reaper.stdin.close()
            reaper.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        (self.data_dir / "children.json").unlink(missing_ok=True)

    def _start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        generated = load_secrets(self.data_dir)
        env = dict(os.environ)
        env.update(self.settings.to_env())
        if not self.settings.database_url:
            self.pg = EmbeddedPostgres(self.data_dir)
            self._tell_reaper({"postgres": [str(self.pg.bin), str(self.pg.pgdata), self.pg.user_for_stop()]})
            env["DATABASE_URL"] = self.pg.start()
            say("relay", f"embedded Postgres on 127.0.0.1:{self.pg.port} (data in {self.pg.pgdata})")
        if not self.settings.redis_url:
            self.redis = EmbeddedRedis(self.data_dir)
            env["REDIS_URL"] = self.redis.start()
            self._tell_reaper({"group": self.redis.proc.pid})
            say("relay", f"embedded Redis on 127.0.0.1:{self.redis.port} (AOF in {self.redis.dir})")
        from shared.db import upgrade

        upgrade(env["DATABASE_URL"])
        say("relay", "database migrated")
        token = self.settings.listener_tokens[0].get() if self.settings.listener_tokens else None
        if token is None:
            token = generated["listener_token"]
            env["RELAY_LISTENER_TOKENS"] = token
        password = self.settings.admin_password.get() if self.settings.admin_password else None
        if password is None:
            password = generated["admin_password"]
            env["RELAY_ADMIN_PASSWORD"] = password
        # Flower can shut workers down: never without basic auth, by default the admin user and password
        env.setdefault("FLOWER_BASIC_AUTH", f"{self.settings.admin_user}:{password}")
        flower_auth = ("same user and password" if env["FLOWER_BASIC_AUTH"] == f"{self.settings.admin_user}:{password}"
                       else "user and password from FLOWER_BASIC_AUTH")
        if self.attach_simulator:
            self._start_simulator(env, generated["simulator_api_key"])
        channels = self._channel_roles(env)
        env["PYTHONUNBUFFERED"] = "1"
        relay = [sys.executable, "-m", "cli.main"]
        self.flower_port = free_port(self.flower_port)
        for child in (
            Child("web", relay + ["web", "--port", str(self.port)]),
            Child("worker", relay + ["worker", "--queues", ",".join(CAMPAIGN_QUEUES),
                                     "--concurrency", str(self.workers)] + self._metrics_port("worker"),
                  nice=self.worker_nice),
            *(Child(name, relay + ["worker", "--queues", REALTIME] + REALTIME_POOL + self._metrics_port(name))
              for name in ("realtime", *(f"realtime{i + 1}" for i in range(1, REALTIME_PROCESSES)))),
            Child("beat", relay + ["beat", "--schedule-file", str(self.data_dir / "beat-schedule")],
                  nice=self.worker_nice),
            Child("flower", relay + ["flower", "--port", str(self.flower_port), "--address", "127.0.0.1"],
                  nice=self.worker_nice),
        ):
            child.start(env)
            self.children.append(child)
            self._started(child)
        self._wait_ready()
        base = f"http://127.0.0.1:{self.port}"
        lines = [
            f"relay is up: {base}",
            f"  listener : {base}/optimove/events?token={token}",
            f"  status   : {base}/api/campaigns/<id>  (user {self.settings.admin_user}, password {password})",
            f"  admin    : {base}/admin  (same user and password)",
            f"  flower   : http://127.0.0.1:{self.flower_port}  ({flower_auth})",
            f"  metrics  : {base}/metrics",
        ]
        metrics_host = self.settings.worker_metrics_bind
        metrics_host = "127.0.0.1" if metrics_host in ("0.0.0.0", "::") else metrics_host
        if self.worker_metrics:
            lines.append(f"  workers  : each worker's own metrics on http://{metrics_host}:<port>/metrics: "
                         + ", ".join(f"{name} {port}" for name, port in self.worker_metrics.items()))
        if self.attach_simulator:
            lines += ["  simulator: fake Optimove, bonus system and send service attached (no OPTIMOVE_API_URL set)",
                      "  try it   : relay simulate campaign" + self._data_dir_option(),
                      "             relay simulate campaign --role send" + self._data_dir_option(),
                      "             relay simulate conditional" + self._data_dir_option(),
                      "             relay simulate realtime --role send" + self._data_dir_option()]
        lines.append("Ctrl-C stops everything.")
        for line in lines:
            say("relay", line)
        (self.data_dir / "up.json").write_text(json.dumps({
            "url": base, "listener_url": f"{base}/optimove/events?token={token}",
            "admin_user": self.settings.admin_user, "admin_password": password,
            "flower_url": f"http://127.0.0.1:{self.flower_port}", "pid": os.getpid(), "channels": channels,
            "channel_attributes": self._channel_attributes(), "database_url": env["DATABASE_URL"],
            "worker_metrics": {name: f"http://{metrics_host}:{port}/metrics"
                               for name, port in self.worker_metrics.items()},
            **getattr(self, "simulator_info", {}),
        }))
        (self.data_dir / "up.json").chmod(0o600)

    def _metrics_port(self, name: str) -> list[str]:
        """`--metrics-port` for the worker child `name`: the next free port from RELAY_WORKER_METRICS_PORT (9400
        when unset; none when it is 0)."""
        first = self.settings.worker_metrics_port
        if first == 0:
            return []
        wanted = max(self.worker_metrics.values()) + 1 if self.worker_metrics else (first or WORKER_METRICS_PORT)
        port = next((p for p in range(wanted, min(wanted + 100, 65536)) if free_port(p) == p), None) or free_port()
        self.worker_metrics[name] = port
        return ["--metrics-port", str(port)]

    def _data_dir_option(self) -> str:
        """` --data-dir DIR` unless the data folder is the default one of the current directory."""
        default = (Path.cwd() / ".relay").absolute()
        return "" if self.data_dir == default else f" --data-dir {self.data_dir}"

    def _start_simulator(self, env: dict[str, str], api_key: str) -> None:
        ready = self.data_dir / "simulator.json"
        ready.unlink(missing_ok=True)
        child = Child("simulator", [sys.executable, "-m", "simulator", "serve", "--optimove-port", "0",
                                    "--bonus-port", "0", "--ready-file", str(ready),
                                    "--rate-limit", str(self.settings.optimove_rate_limit)],
                      nice=self.worker_nice)
        child.start(dict(env, PYTHONUNBUFFERED="1", SIMULATOR_API_KEY=api_key))
        self.children.append(child)
        self._started(child)
        deadline = time.monotonic() + 30
        while not ready.exists():
            if time.monotonic() > deadline or child.proc.poll() is not None:
                raise RuntimeError("the simulator did not start")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.simulator_info = {"simulator": info}
        env.update({"OPTIMOVE_API_URL": info["optimove_url"], "OPTIMOVE_API_KEY": api_key,
                    "BONUS_ADAPTER": "http", "BONUS_URL": info["bonus_url"]})
        if env.get("BONUS_MODE") == "single":
            env["BONUS_URL"] = info["bonus_single_url"]
        if not self.settings.bonus_revoke_url:
            env["BONUS_REVOKE_URL"] = info["bonus_revoke_url"]
        if not self.settings.send_url:
            env.update({"SEND_ADAPTER": "http", "SEND_URL": info["send_url"]})
            if env.get("SEND_MODE") == "single":
                env["SEND_URL"] = info["send_single_url"]

    def _channel_roles(self, env: dict[str, str]) -> dict[str, str]:
        """Channel id -> role of the channel config; with the simulator and no config, the demo's (written to a file)."""
        if self.attach_simulator and not self.settings.channel_config_path:
            path = self.data_dir / "demo-channels.json"
            path.write_text(json.dumps(DEMO_CHANNELS, indent=2))
            env["RELAY_CHANNEL_CONFIG"] = str(path)
            return {k: v["role"] for k, v in DEMO_CHANNELS["channels"].items()}
        return {str(k): v for k, v in self.settings.channels.roles.items()}

    def _channel_attributes(self) -> dict[str, list[str]]:
        """Channel id -> the customer attributes its send campaigns request (for the simulator's drivers)."""
        if self.attach_simulator and not self.settings.channel_config_path:
            return {k: v["attributes"] for k, v in DEMO_CHANNELS["channels"].items() if v.get("attributes")}
        return {str(k): list(v) for k, v in self.settings.channels.attributes.items()}

    def _nice_backends(self) -> None:
        """Every 2 s: the embedded Postgres' backends of niced children get their niceness."""
        if not (self.pg and self.worker_nice > 0) or time.monotonic() < self._nice_next:
            return
        self._nice_next = time.monotonic() + 2
        try:
            if self._nice_conn is None or self._nice_conn.closed:
                self._nice_conn = psycopg2.connect(self.pg.url, connect_timeout=3, application_name="relay-up")
                self._nice_conn.autocommit = True
            nice_backends(self._nice_conn, self._niced)
        except psycopg2.Error:  # Postgres stopping or restarting: the next round tries again
            self._nice_conn = None

    def _wait_ready(self, timeout: float = 60) -> None:
        web = next(c for c in self.children if c.name == "web")
        wait_for_port(self.port, timeout, web.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping.is_set():
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError("the relay did not become ready")

    def _stop(self) -> None:
        say("relay", "stopping")
        for child in self.children:
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say("relay", f"{child.name} did not stop in time; killing it")
            child.signal_group(signal.SIGKILL)  # leftovers of the group (pool children, gunicorn workers)
            if child.proc.poll() is None:
                child.proc.wait(5)
        if self._nice_conn is not None:
            self._nice_conn.close()
        if self.redis:
            self.redis.stop()
        if self.pg:
            self.pg.stop()
        say("relay", "stopped")
