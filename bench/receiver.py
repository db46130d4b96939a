"""Listener throughput and latency, full path versus a bare Flask endpoint, in one run.

    .venv/bin/python bench/receiver.py [--duration 10] [--rate 200] [--connections 16] [--json]

Starts Postgres and Redis (embedded under a temp folder unless DATABASE_URL/REDIS_URL are set),
the relay web process exactly as production runs it (`python -m cli.main web`), and a bare Flask
app (`bench/_bare_app.py`) under the same gunicorn flags. Then, for each target, one after the
other with the same load generator:

* max throughput: a closed loop over `--connections` keep-alive connections for `--duration`
  seconds, counting 2xx answers;
* latency: an open loop at `--rate` requests/s for `--duration` seconds, each latency measured
  from the request's scheduled send time (a slow answer does not delay the schedule, so queueing
  shows up in the figures instead of being hidden).

Every request to the relay is a different valid notification (EventTypeID 13, a new CampaignID
each time), so each one inserts, commits and enqueues. Afterwards the new `notifications` rows
and the new entries of the Redis `notifications` list are compared with the number of 202s.

The load generator runs on the same cores as the servers; its CPU use is reported next to the
servers' so the figures can be read with that in mind. Exits 0 whether or not targets are met.
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import start_stores, stop_group  # noqa: E402
from cli.embedded import free_port, wait_for_port  # noqa: E402

PATH = "/optimove/events"
TOKEN = "bench-listener-token-0123456789abcdef"
BODY = b'{"EventTypeID":13,"CampaignID":%d,"ChannelID":%d,"TimeStamp":"2024-05-01 10:00:00"}'
HEADERS = {"Content-Type": "application/json", "X-Relay-Token": TOKEN}


def gunicorn_flags(workers: int, threads: int) -> list[str]:
    """The flags `relay web --workers W --threads T` gives gunicorn (cli/main.py), for the bare app too."""
    return ["--workers", str(workers), "--threads", str(threads),
            "--worker-class", "gthread" if threads > 1 else "sync",
            "--access-logfile", "-", "--access-logformat", '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms',
            "--graceful-timeout", "10"]
TARGET_RATIO = 0.3
TARGET_P99_MS = 25.0
IDS_PER_PHASE = 10 ** 9


# --- load generator (runs in a child process so its CPU can be counted on its own) -------------

@dataclass
class Tally:
    """What one load phase saw."""

    statuses: dict[int, int] = field(default_factory=dict)
    failures: int = 0
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def merge(self, other: "Tally") -> None:
        """Add another process's tally to this one."""
        for code, n in other.statuses.items():
            self.statuses[code] = self.statuses.get(code, 0) + n
        self.failures += other.failures
        self.latencies.extend(other.latencies)
        self.seconds = max(self.seconds, other.seconds)
        self.cpu_seconds += other.cpu_seconds

    @property
    def ok(self) -> int:
        return sum(n for code, n in self.statuses.items() if 200 <= code < 300)

    @property
    def errors(self) -> int:
        return self.failures + sum(n for code, n in self.statuses.items() if not 200 <= code < 300)


class Sender:
    """One keep-alive connection posting notifications with ever new CampaignIDs."""

    def __init__(self, port: int, ids, channel: int):
        self.port, self.ids, self.channel = port, ids, channel
        self.conn: http.client.HTTPConnection | None = None

    def post(self) -> int | None:
        """Send one notification; its HTTP status, or None when the connection failed."""
        body = BODY % (next(self.ids), self.channel)
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.conn.request("POST", PATH, body, HEADERS)
            response = self.conn.getresponse()
            response.read()
            if response.will_close:
                self.close()
            return response.status
        except (OSError, http.client.HTTPException):
            self.close()
            return None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _record(local: Tally, status: int | None) -> None:
    if status is None:
        local.failures += 1
    else:
        local.statuses[status] = local.statuses.get(status, 0) + 1


def _run_threads(threads: int, body) -> Tally:
    tallies = [Tally() for _ in range(threads)]
    cpu0, t0 = os.times(), time.monotonic()
    workers = [threading.Thread(target=body, args=(t,), daemon=True) for t in tallies]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    cpu1 = os.times()
    total = Tally(seconds=time.monotonic() - t0,
                  cpu_seconds=(cpu1.user - cpu0.user) + (cpu1.system - cpu0.system))
    for t in tallies:
        total.merge(t)
    total.seconds = time.monotonic() - t0
    return total


def closed_loop(port: int, threads: int, seconds: float, first_id: int, channel: int) -> Tally:
    """Each thread sends back to back on its own connection until `seconds` have passed."""
    ids = itertools.count(first_id)
    end = time.monotonic() + seconds

    def run(local: Tally) -> None:
        sender = Sender(port, ids, channel)
        while time.monotonic() < end:
            _record(local, sender.post())
        sender.close()

    return _run_threads(threads, run)


def open_loop(port: int, threads: int, seconds: float, rate: float, start: float, slot: int, slots: int,
              first_id: int, channel: int) -> Tally:
    """Send request k at `start + (slot + k*slots)/rate` on whichever thread is free; latency from that time."""
    ids = itertools.count(first_id)
    ticks = itertools.count()
    end = start + seconds

    def run(local: Tally) -> None:
        sender = Sender(port, ids, channel)
        while True:
            due = start + (slot + next(ticks) * slots) / rate
            if due >= end:
                break
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            status = sender.post()
            local.latencies.append(time.monotonic() - due)
            _record(local, status)
        sender.close()

    return _run_threads(threads, run)


def run_load(procs: int, fn, *args, per_proc) -> Tally:
    """Run `fn(*args, *per_proc(i))` in `procs` child processes and merge what they saw."""
    total = Tally()
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(fn, *args, *per_proc(i)) for i in range(procs)]
        for f in futures:
            total.merge(f.result())
    return total


# --- processes and measurement ----------------------------------------------------------------

def process_tree(pid: int) -> list[psutil.Process]:
    """`pid` and its descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def cpu_by_pid(roots: list[int]) -> dict[int, float]:
    """User+system CPU seconds of every process under `roots`."""
    out = {}
    for pid in roots:
        for p in process_tree(pid):
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except psutil.Error:
                pass
    return out


def machine_busy_pct(before, after) -> float:
    """CPU in use on the whole machine between two `psutil.cpu_times()`, in % of one core."""
    idle = (after.idle + getattr(after, "iowait", 0)) - (before.idle + getattr(before, "iowait", 0))
    total = sum(after) - sum(before)
    return round(100 * os.cpu_count() * (1 - idle / total), 1) if total > 0 else 0.0


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


class Server:
    """A gunicorn process group started from the repo root with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict, port: int, log_path: Path):
        self.name, self.argv, self.env, self.port, self.log_path = name, argv, env, port, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        """Until a worker answers a real POST (the port opens before the workers are booted)."""
        try:
            wait_for_port(self.port, timeout, self.proc)
            deadline = time.monotonic() + timeout
            sender = Sender(self.port, itertools.count(), 0)
            while sender.post() is None:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} did not answer on port {self.port}")
                time.sleep(0.2)
            sender.close()
        except Exception as exc:
            raise RuntimeError(f"{exc}\n--- {self.log_path} (tail) ---\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the whole group, SIGKILL what is left after gunicorn's graceful timeout."""
        if self.proc is not None:
            stop_group(self.proc, 15)
            self.proc = None


def store_counts(db_url: str, redis_url: str) -> tuple[int, int]:
    """Rows in `notifications` and entries in the Redis `notifications` list (the Celery queue)."""
    import redis

    from shared import repository as repo
    from shared.db import make_engine

    engine = make_engine(db_url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = repo.count_notifications(conn)
    finally:
        engine.dispose()
    client = redis.Redis.from_url(redis_url)
    try:
        return rows, client.llen("notifications")
    finally:
        client.close()


# --- the benchmark ----------------------------------------------------------------------------

def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def measure(server: Server, args, channel: int, phase_ids, cpu_roots: dict[str, list[int]]) -> dict:
    """Warm up, then the closed-loop and open-loop phases against one server."""
    procs = args.client_procs
    threads = max(1, args.connections // procs)

    def load(fn, *common):
        """One phase over `procs` processes, each with its own id range; the tally and CPU% by group."""
        first_id = next(phase_ids)
        before, machine0 = {k: cpu_by_pid(v) for k, v in cpu_roots.items()}, psutil.cpu_times()
        tally = run_load(procs, fn, server.port, threads, *common,
                         per_proc=lambda i: (*(() if fn is closed_loop else (i, procs)),
                                             first_id + i * IDS_PER_PHASE // procs, channel))
        after, machine1 = {k: cpu_by_pid(v) for k, v in cpu_roots.items()}, psutil.cpu_times()
        cpu = {k: round(100 * cpu_delta(before[k], after[k]) / tally.seconds, 1) for k in cpu_roots}
        cpu["load generator"] = round(100 * tally.cpu_seconds / tally.seconds, 1)
        cpu["machine"] = machine_busy_pct(machine0, machine1)
        return tally, cpu

    warm, _ = load(closed_loop, min(2.0, args.duration))
    peak, peak_cpu = load(closed_loop, args.duration)
    timed, timed_cpu = load(open_loop, args.duration, args.rate, time.monotonic() + 0.5)
    lat = sorted(timed.latencies)
    return {
        "max_rps": round(peak.ok / peak.seconds, 1),
        "p50_ms": round(1000 * percentile(lat, 0.50), 2),
        "p99_ms": round(1000 * percentile(lat, 0.99), 2),
        "max_ms": round(1000 * (lat[-1] if lat else 0.0), 2),
        "errors": peak.errors + timed.errors,
        "rate_achieved": round(timed.ok / args.duration, 1),
        "server_cpu_ms_per_req": round(10 * peak_cpu["server"] / (peak.ok / peak.seconds), 3) if peak.ok else None,
        "cpu_pct_at_max": peak_cpu,
        "cpu_pct_at_rate": timed_cpu,
        "accepted_202": sum(t.statuses.get(202, 0) for t in (warm, peak, timed)),
        "statuses": {str(k): v for k, v in sorted(_merged_statuses(warm, peak, timed).items())},
        "connection_failures": warm.failures + peak.failures + timed.failures,
    }


def _merged_statuses(*tallies: Tally) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in tallies:
        for code, n in t.statuses.items():
            out[code] = out.get(code, 0) + n
    return out


def run(args) -> dict:
    """Start everything, measure bare then relay, check the stores, stop everything."""
    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        db_url, redis_url, store_pids, notes = start_stores(tmp, stack, appendonly=False)
        (tmp / "metrics").mkdir()
        env = {**os.environ, "DATABASE_URL": db_url, "REDIS_URL": redis_url, "RELAY_LISTENER_TOKENS": TOKEN,
               "RELAY_LOG_LEVEL": "warning", "PROMETHEUS_MULTIPROC_DIR": str(tmp / "metrics")}
        py = sys.executable
        relay_port, bare_port = free_port(), free_port()
        flags = gunicorn_flags(args.web_workers, args.web_threads)
        relay = Server("relay", [py, "-m", "cli.main", "web", "--port", str(relay_port), "--workers",
                                 str(args.web_workers), "--threads", str(args.web_threads)],
                       env, relay_port, tmp / "relay.log")
        bare = Server("bare", [py, "-m", "gunicorn", "--bind", f"127.0.0.1:{bare_port}", *flags,
                               "bench._bare_app:app"], env, bare_port, tmp / "bare.log")
        for server in (relay, bare):
            stack.callback(server.stop)
            server.start()
        for server in (relay, bare):
            server.wait_ready()

        channel = int(time.time()) % 10 ** 9
        phase_ids = itertools.count(IDS_PER_PHASE, IDS_PER_PHASE)
        rows0, queued0 = store_counts(db_url, redis_url)
        results = {}
        for server in (bare, relay):
            roots = {"server": [server.proc.pid]}
            if store_pids:
                roots["stores"] = store_pids
            results[server.name] = measure(server, args, channel, phase_ids, roots)
        rows1, queued1 = store_counts(db_url, redis_url)

    r, b = results["relay"], results["bare"]
    ratio = round(r["max_rps"] / b["max_rps"], 3) if b["max_rps"] else 0.0
    rows, queued = rows1 - rows0, queued1 - queued0
    return {
        "relay": r, "bare": b, "ratio": ratio, "rate": args.rate,
        "targets": {f"ratio>={TARGET_RATIO}": ratio >= TARGET_RATIO,
                    f"p99<={TARGET_P99_MS:g}ms@{args.rate:g}": r["p99_ms"] <= TARGET_P99_MS},
        "rows_stored": rows, "tasks_enqueued": queued,
        "consistent": rows == queued == r["accepted_202"],
        "setup": {"duration_s": args.duration, "connections": args.connections,
                  "client_procs": args.client_procs, "cpus": os.cpu_count(), "stores": ", ".join(notes),
                  "gunicorn": " ".join(gunicorn_flags(args.web_workers, args.web_threads)[:6])},
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT)
                                                      if sys.executable.startswith(str(ROOT)) else sys.executable,
                                                      *sys.argv]),
    }


def report(res: dict) -> str:
    """A readable table of the result."""
    rate = res["rate"]
    lines = [f"command: {res['command']}",
             f"setup:   {res['setup']['cpus']} CPUs, {res['setup']['gunicorn']}, "
             f"{res['setup']['connections']} connections, {res['setup']['duration_s']:g}s per phase, "
             f"{res['setup']['stores']}",
             "",
             f"{'target':<7}{'max req/s':>11}{'@' + format(rate, 'g') + '/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
             f"{'max ms':>9}{'errors':>8}{'cpu ms/req':>12}   CPU% of a core at max: server / load gen / stores / machine"]
    for name in ("bare", "relay"):
        m = res[name]
        cpu = m["cpu_pct_at_max"]
        lines.append(f"{name:<7}{m['max_rps']:>11.1f}{m['rate_achieved']:>10.1f}{m['p50_ms']:>9.2f}"
                     f"{m['p99_ms']:>9.2f}{m['max_ms']:>9.2f}{m['errors']:>8}{m['server_cpu_ms_per_req'] or 0:>12.2f}   "
                     f"{cpu['server']:.0f} / {cpu['load generator']:.0f} / "
                     f"{cpu.get('stores', float('nan')):.0f} / {cpu['machine']:.0f}")
    lines.append(f"(cpu ms/req: server CPU per request at max throughput; machine = {100 * res['setup']['cpus']}% "
                 "when every core is busy)")
    for name in ("bare", "relay"):
        for phase in ("cpu_pct_at_max", "cpu_pct_at_rate"):
            cpu = res[name][phase]
            other = cpu["machine"] - sum(v for k, v in cpu.items() if k != "machine")
            if other > 25:
                lines.append(f"WARNING: other processes used ~{other:.0f}% of a core during {name} "
                             f"{phase.removeprefix('cpu_pct_')}: figures are lower bounds, rerun on a quiet machine")
    lines.append("")
    lines.append(f"ratio relay/bare max req/s: {res['ratio']:.3f}")
    for name, met in res["targets"].items():
        lines.append(f"target {name}: {'met' if met else 'MISSED'}")
    lines.append(f"relay 202s: {res['relay']['accepted_202']}, notifications rows added: {res['rows_stored']}, "
                 f"tasks enqueued: {res['tasks_enqueued']} -> {'consistent' if res['consistent'] else 'MISMATCH'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement phase")
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s of the latency phase")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections of the load generator")
    parser.add_argument("--client-procs", type=int, default=1,
                        help="load generator processes (the connections are split between them)")
    parser.add_argument("--web-workers", type=int, default=os.cpu_count() or 2,
                        help="gunicorn workers of both servers (default: one per CPU, as `relay web`)")
    parser.add_argument("--web-threads", type=int, default=1, help="gunicorn threads per worker of both servers")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)

    def terminate(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, terminate)

    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
