"""What both benchmarks need: the stores (from the environment or embedded) and stopping process groups."""
from __future__ import annotations

import os
import signal
import subprocess
from contextlib import ExitStack
from pathlib import Path

from cli.embedded import EmbeddedPostgres, EmbeddedRedis


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group of `proc`, SIGKILL whatever is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_stores(tmp: Path, stack: ExitStack, appendonly: bool) -> tuple[str, str, list[int], list[str]]:
    """DATABASE_URL/REDIS_URL from the environment, else embedded servers (stopped by `stack`); migrated.

    Returns the URLs, the pids of the embedded servers (for CPU accounting) and a note per store.
    """
    from shared.db import upgrade

    db_url, redis_url = os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL")
    pids, notes = [], []
    if not db_url:
        pg = EmbeddedPostgres(tmp / "stores")
        stack.callback(pg.stop)
        db_url = pg.start()
        pids.append(int((pg.pgdata / "postmaster.pid").read_text().split()[0]))
        notes.append("embedded Postgres (fsync on)")
    else:
        notes.append("Postgres from DATABASE_URL")
    if not redis_url:
        rd = EmbeddedRedis(tmp / "stores", appendonly=appendonly)
        stack.callback(rd.stop)
        redis_url = rd.start()
        pids.append(rd.proc.pid)
        notes.append("embedded Redis (AOF everysec)" if appendonly else "embedded Redis (no AOF)")
    else:
        notes.append("Redis from REDIS_URL")
    upgrade(db_url)
    return db_url, redis_url, pids, notes


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a process's log file ("" when it cannot be read)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
