"""Real relay processes for end-to-end and fault tests: `relay web` and `relay worker` as subprocesses."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from cli.embedded import free_port
from tests.conftest import ADMIN_PASSWORD, ROOT, TOKEN, poll


def relay_env(database_url: str, redis_url: str, **extra) -> dict[str, str]:
    """The environment of a relay process for tests (nothing inherited from the runner's relay settings)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "OPTIMOVE_", "BONUS_", "SEND_", "DATABASE_URL", "REDIS_URL",
                                "BROKER_URL"))}
    env.update({"DATABASE_URL": database_url, "REDIS_URL": redis_url, "RELAY_LISTENER_TOKENS": TOKEN,
                "RELAY_ADMIN_PASSWORD": ADMIN_PASSWORD, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Processes:
    """Starts relay processes in their own sessions, logs to files, and kills every group at the end."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", *args], env=env, cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def web(self, env: dict[str, str], name: str = "web") -> str:
        """Start `relay web` on a free port; return its base URL once /readyz answers 200."""
        for attempt in range(3):
            port = free_port()
            proc = self.start(name, ["web", "--port", str(port), "--workers", "2", "--threads", "4"], env)
            outcome = poll(lambda: self._bound(name, proc, port), 30, 0.05, message=f"{name} listening on {port}")
            if outcome == "ours":
                break
            if outcome == "exited":
                raise AssertionError(f"{name} exited with code {proc.returncode}:\n{self.logs()}")
            # another process took the port between the check and gunicorn's bind: another port
            self.kill(name)
            (self.log_dir / f"{name}.log").rename(self.log_dir / f"{name}.port-taken-{attempt}.log")
        else:
            raise AssertionError(f"{name}: every port tried was taken before gunicorn could bind it")
        base = f"http://127.0.0.1:{port}"
        poll(lambda: ready(base), 60, 0.1, message=f"{name} ready")
        return base

    def _bound(self, name: str, proc: subprocess.Popen, port: int) -> str | None:
        """"ours" once gunicorn says it listens on `port`, "taken" when it could not bind it, "exited"."""
        text = (self.log_dir / f"{name}.log").read_text(errors="replace")
        if f"Listening at: http://127.0.0.1:{port}" in text:
            return "ours"
        if "Address already in use" in text:
            return "taken"
        return "exited" if proc.poll() is not None else None

    def worker(self, env: dict[str, str], name: str = "worker", concurrency: int = 2) -> subprocess.Popen:
        """Start `relay worker` on every queue."""
        return self.start(name, ["worker", "--concurrency", str(concurrency)], env)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process's whole group (SIGKILL: the worker and its pool children die at once)."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(30)

    def logs(self, tail: int | None = 6000) -> str:
        """Every log (the last `tail` characters of each; all of it with `tail=None`)."""
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-tail if tail else 0:]}"
                         for p in sorted(self.log_dir.glob("*.log")))

    def stop_all(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs.clear()


def ready(base: str) -> bool:
    """Whether a relay answers /readyz with 200 (a slow or refused answer is 'not yet')."""
    try:
        return requests.get(base + "/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def post_notification(base: str, body: dict) -> requests.Response:
    """POST one notification to a running relay."""
    return requests.post(f"{base}/optimove/events?token={TOKEN}", json=body, timeout=10)


def campaign_status(base: str, campaign_id: int) -> dict:
    """The relay's status view of a campaign."""
    response = requests.get(f"{base}/api/campaigns/{campaign_id}", auth=("admin", ADMIN_PASSWORD), timeout=10)
    response.raise_for_status()
    return response.json()
