"""The reaper of `relay up`: stops every child and embedded server when the supervisor dies, however.

`relay up` starts it first, in its own session, with a pipe on its stdin, and tells it each thing
it starts, one JSON object per line:

    {"group": PGID}                         a child's process group (each child has its own session)
    {"postgres": [BIN_DIR, PGDATA, USER]}   an embedded Postgres (it daemonises through pg_ctl)
    {"done": true}                          the supervisor stopped everything itself: nothing to do

When the pipe closes without `done` (the supervisor was SIGKILLed, crashed, or lost its terminal),
the reaper sends SIGTERM to every group, SIGKILL to what is left after a grace period, and stops
Postgres with `pg_ctl stop -m fast`. Nothing it is told of outlives the supervisor.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

GRACE_SECONDS = 10.0


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def reap(groups: list[int], postgres: list[tuple[str, str, str | None]], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM every group, SIGKILL the ones left after `grace` seconds, stop every Postgres."""
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(g) for g in groups):
        time.sleep(0.1)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for bin_dir, pgdata, user in postgres:
        if os.path.exists(os.path.join(pgdata, "postmaster.pid")):
            subprocess.run([os.path.join(bin_dir, "pg_ctl"), "-D", pgdata, "-m", "fast", "-w", "-t", "60", "stop"],
                           capture_output=True, user=user, timeout=90)


def main() -> None:
    """Read the supervisor's lines until `done` or end of input; reap on end of input."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the supervisor
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal
    groups: list[int] = []
    postgres: list[tuple[str, str, str | None]] = []
    for line in sys.stdin:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if message.get("done"):
            return
        if "group" in message:
            groups.append(int(message["group"]))
        if "postgres" in message:
            bin_dir, pgdata, user = message["postgres"]
            postgres.append((bin_dir, pgdata, user))
    reap(groups, postgres)


if __name__ == "__main__":
    main()
