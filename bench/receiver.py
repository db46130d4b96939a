"""Listener throughput and latency, full path versus a bare Flask endpoint, alone and with the workers busy.

    .venv/bin/python bench/receiver.py [--mode alone|busy|both] [--duration 10] [--rate 200]
                                       [--connections 16] [--worker-nice 10[,0]] [--busy-customers 500000]
                                       [--busy-settle 15] [--keep-logs] [--json]

Each mode measures the relay listener and a bare Flask app (`bench/_bare_app.py`) side by side, under
the same gunicorn flags, with the same load generator, one after the other (bare first):

* max throughput: a closed loop over `--connections` keep-alive connections for `--duration`
  seconds, counting 2xx answers;
* latency: an open loop at `--rate` requests/s for `--duration` seconds, each latency measured
  from the request's scheduled send time (a slow answer does not delay the schedule, so queueing
  shows up in the figures instead of being hidden).

Every request to the relay is a different valid notification (EventTypeID 13, a new CampaignID
each time), so each one inserts, commits and enqueues. Afterwards the new `notifications` rows
and the new entries of the Redis `notifications` list are compared with the number of 202s.

`alone`: Postgres and Redis (embedded under a temp folder unless DATABASE_URL/REDIS_URL are set),
the relay web process exactly as production runs it (`python -m cli.main web`, `--web-workers` /
`--web-threads`) and the bare app, nothing else. Targets: relay/bare max req/s >= 0.5 and relay
p99 <= 10 ms at `--rate`.

`busy`: `relay up` itself (`python -m cli.main up --data-dir <tmp> --simulator --worker-nice N`:
its own embedded stores unless DATABASE_URL/REDIS_URL are set, web, the campaign worker
`--queues notifications,campaigns,grants --concurrency 2`, four real-time workers, beat, Flower
and the simulator, each at the CPU niceness `relay up` gives it: N for the campaign worker, beat,
Flower and the simulator, 0 for web and the real-time workers), with the bare app beside it at
niceness 0 under `relay up`'s web flags (two sync workers per CPU). A scheduled bonus campaign of
3 channels x `--busy-customers` (50 % overlap, every 2nd customer two promo codes: the
bench/campaign.py shape) is created in the fake Optimove and its three EventTypeID 13
notifications are posted to the listener; `--busy-settle` seconds after the first grants are
recorded (the first pages claimed, grants flowing), both servers are measured while it runs.
The bench's own notifications are not processed meanwhile: the workers are told to stop
consuming the `notifications` queue (Celery's `cancel_consumer`) once the campaign's three are
processed, so the workers spend the phases on the campaign (a notification for an unknown
campaign would cost a run and an Optimove call at `relay up`'s rate limit) and the bench's
tasks stay countable in Redis; RELAY_SWEEP_AFTER is 3600 s so the sweeper does not re-enqueue
them. Per phase the CPU of every `relay up` process group is sampled (campaign worker tree,
real-time workers, beat+Flower+simulator, the supervisor itself, the stores) with the grants
recorded; the workers count as busy when the campaign still runs after the last phase and
grants were recorded in every phase. Target: relay/bare max req/s >= 0.3. `--worker-nice`
takes a comma-separated list (`10,0`) to run one busy block per value, each with a fresh
`relay up`. Afterwards `relay up` gets SIGTERM (it stops its children and stores) and every
process it had started is checked to be gone (killed and reported otherwise).

Niceness and autogroups: when the kernel schedules by autogroup (`/proc/sys/kernel/
sched_autogroup_enabled` = 1, the default of many distributions), each session is one
scheduling group and a task's nice value only ranks it inside its session. `relay up` starts
every child in a session of its own, so the report shows each group's autogroup nice next to
its nice value and warns when the workers' niceness cannot count against web.
`--set-autogroup` writes each niced child's nice value to `/proc/<pid>/autogroup` after the
start, which is what `relay up` would have to do for `--worker-nice` to take effect there.

`both` (default): `alone`, then `busy` for each `--worker-nice`.

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

from bench._common import log_tail, start_stores, stop_group  # noqa: E402
from cli.embedded import free_port, wait_for_port  # noqa: E402
from cli.main import default_web_workers  # noqa: E402

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
TARGET_RATIO = 0.5        # alone: relay / bare max req/s
TARGET_P99_MS = 10.0      # alone: relay p99 at --rate
TARGET_RATIO_BUSY = 0.3   # with the workers busy under `relay up`
IDS_PER_PHASE = 10 ** 9
# --mode busy: the bench/campaign.py campaign shape
BUSY_CHANNELS = (504, 505, 506)
BUSY_CODES = ("WB23", "NV10")
BUSY_OVERLAP = 0.5
BUSY_MULTI_CODE_EVERY = 2


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
    """User+system CPU seconds of every process under `roots` (a negative root: that process alone)."""
    out = {}
    for pid in roots:
        for p in (process_tree(pid) if pid >= 0 else process_tree(-pid)[:1]):
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
        return log_tail(self.log_path, lines)

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


def measure(server, args, channel: int, phase_ids, cpu_roots: dict[str, list[int]], probe=None) -> dict:
    """Warm up, then the closed-loop and open-loop phases against one server (anything with a `port`).

    `probe` (busy mode): a callable returning the campaign's counters, read around each phase.
    """
    procs = args.client_procs
    threads = max(1, args.connections // procs)
    seen = {}

    def load(fn, *common, name=None):
        """One phase over `procs` processes, each with its own id range; the tally and CPU% by group."""
        first_id = next(phase_ids)
        state0 = probe() if probe and name else None
        before, machine0 = {k: cpu_by_pid(v) for k, v in cpu_roots.items()}, psutil.cpu_times()
        tally = run_load(procs, fn, server.port, threads, *common,
                         per_proc=lambda i: (*(() if fn is closed_loop else (i, procs)),
                                             first_id + i * IDS_PER_PHASE // procs, channel))
        after, machine1 = {k: cpu_by_pid(v) for k, v in cpu_roots.items()}, psutil.cpu_times()
        cpu = {k: round(100 * cpu_delta(before[k], after[k]) / tally.seconds, 1) for k in cpu_roots}
        cpu["load generator"] = round(100 * tally.cpu_seconds / tally.seconds, 1)
        cpu["machine"] = machine_busy_pct(machine0, machine1)
        if state0 is not None:
            state1 = probe()
            seen[name] = {"grants_per_s": round((state1["granted"] - state0["granted"]) / tally.seconds, 1),
                          "granted_at_end": state1["granted"], "backlog_at_end": state1["backlog"]}
        return tally, cpu

    warm, _ = load(closed_loop, min(2.0, args.duration))
    peak, peak_cpu = load(closed_loop, args.duration, name="campaign_at_max")
    timed, timed_cpu = load(open_loop, args.duration, args.rate, time.monotonic() + 0.5, name="campaign_at_rate")
    lat = sorted(timed.latencies)
    return {
        **seen,
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


def run_alone(args) -> dict:
    """Mode `alone`: start the stores, relay web and the bare app, measure bare then relay, check the stores,
    stop everything."""
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
        "mode": "alone", "relay": r, "bare": b, "ratio": ratio, "rate": args.rate,
        "targets": {f"ratio>={TARGET_RATIO}": ratio >= TARGET_RATIO,
                    f"p99<={TARGET_P99_MS:g}ms@{args.rate:g}": r["p99_ms"] <= TARGET_P99_MS},
        "rows_stored": rows, "tasks_enqueued": queued,
        "consistent": rows == queued == r["accepted_202"],
        "setup": {"duration_s": args.duration, "connections": args.connections,
                  "client_procs": args.client_procs, "cpus": os.cpu_count(), "stores": ", ".join(notes),
                  "gunicorn": " ".join(gunicorn_flags(args.web_workers, args.web_threads)[:6])},
    }


# --- mode busy: the listener under `relay up` while a campaign keeps the workers busy -----------

# CPU accounting groups of `relay up`'s processes: web; the campaign worker; the real-time workers; the niced
# helpers; the supervisor itself (and its reaper); the stores
GROUP_NAMES = ("server", "workers", "realtime", "beat+flower+sim", "relay up", "stores")


def _kind(cmd: list[str]) -> str | None:
    """Which accounting group a direct child of `relay up` belongs to, from its command line."""
    if cmd and "redis-server" in os.path.basename(cmd[0]):
        return "stores"
    module = cmd[cmd.index("-m") + 1] if "-m" in cmd[:-1] else ""
    if module == "gunicorn":
        return "server"
    if module == "simulator":
        return "beat+flower+sim"
    if module == "cli.reaper":
        return "relay up"
    if module == "cli.main" and cmd.index("cli.main") + 1 < len(cmd):
        sub = cmd[cmd.index("cli.main") + 1]
        if sub == "web":
            return "server"
        if sub == "worker":
            queues = cmd[cmd.index("--queues") + 1].split(",") if "--queues" in cmd[:-1] else []
            return "realtime" if queues == ["realtime"] else "workers"
        if sub in ("beat", "flower"):
            return "beat+flower+sim"
    return None


class RelayUp:
    """`python -m cli.main up` in its own session, its output in a log file. Every process it starts is
    remembered (pid and start time) so that `stop` can check none is left once `relay up` has exited."""

    def __init__(self, data_dir: Path, nice: int, env: dict, log_path: Path):
        self.data_dir, self.nice, self.env, self.log_path = data_dir, nice, env, log_path
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, tuple[float, str]] = {}
        self.leftovers: list[str] = []
        self.stop_seconds: float | None = None

    def start(self) -> "RelayUp":
        argv = [sys.executable, "-m", "cli.main", "up", "--data-dir", str(self.data_dir), "--port", str(self.port),
                "--flower-port", str(free_port()), "--simulator", "--worker-nice", str(self.nice)]
        self.command = " ".join(shlex.quote(a) for a in ["relay", *argv[3:]])
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"relay up exited with code {self.proc.returncode}\n"
                               f"--- {self.log_path} (tail) ---\n{self.log_tail()}")

    def wait_ready(self, timeout: float = 180) -> dict:
        """`up.json` once `relay up` has written it (web ready, every child started)."""
        path, deadline = self.data_dir / "up.json", time.monotonic() + timeout
        while True:
            self.check()
            try:
                info = json.loads(path.read_text())
                break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"relay up not ready in {timeout:.0f}s\n{self.log_tail()}")
            time.sleep(0.2)
        self.track()
        return info

    def store_urls(self) -> tuple[str, str]:
        """The stores `relay up` uses: DATABASE_URL/REDIS_URL when set, else its embedded ones."""
        from cli.embedded import DB_NAME

        db = self.env.get("DATABASE_URL") or \
            f"postgresql://postgres@127.0.0.1:{int((self.data_dir / 'postgres.port').read_text())}/{DB_NAME}"
        rd = self.env.get("REDIS_URL") or f"redis://127.0.0.1:{int((self.data_dir / 'redis.port').read_text())}/0"
        return db, rd

    def groups(self) -> dict[str, list[int]]:
        """CPU accounting: group -> root pids (each with its descendants; negative: that process alone)."""
        out: dict[str, list[int]] = {name: [] for name in GROUP_NAMES}
        out["relay up"].append(-self.proc.pid)
        for child in psutil.Process(self.proc.pid).children():
            try:
                kind = _kind(child.cmdline())
            except psutil.Error:
                continue
            if kind:
                out[kind].append(child.pid)
        pg = self.data_dir / "postgres" / "postmaster.pid"
        if pg.exists():  # pg_ctl daemonises the postmaster: not a child of `relay up`
            out["stores"].append(int(pg.read_text().split()[0]))
        return out

    def track(self) -> None:
        """Remember every process `relay up` runs now (its tree and the embedded Postgres')."""
        roots = [abs(pid) for pids in self.groups().values() for pid in pids] if self.proc.poll() is None else []
        roots.append(self.proc.pid)  # the whole tree of `relay up`, whatever it is
        for root in roots:
            for p in process_tree(root):
                try:
                    self.seen.setdefault(p.pid, (p.create_time(), " ".join(p.cmdline()[:6]) or p.name()))
                except psutil.Error:
                    pass

    def stop(self) -> None:
        """SIGTERM `relay up` (it stops its children, then its stores), SIGKILL it after 90 s; then kill and
        report any process it had started that is still running."""
        if self.proc is None:
            return
        try:
            self.track()
        except psutil.Error:
            pass
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.leftovers.append(f"{self.proc.pid} relay up (did not exit within 90 s of SIGTERM)")
                stop_group(self.proc, 0)
        self.stop_seconds = round(time.monotonic() - t0, 1)
        for pid, (created, name) in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() != created or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                self.leftovers.append(f"{pid} {name}")
                p.kill()
            except psutil.Error:
                pass
        self.proc = None


class CampaignProbe:
    """The campaign's counters in Postgres and the campaign queues' backlog in Redis."""

    def __init__(self, db_url: str, redis_url: str, campaign_id: int):
        import psycopg2
        import redis

        self.campaign_id = campaign_id
        self.conn = psycopg2.connect(db_url)
        self.conn.autocommit = True
        self.redis = redis.Redis.from_url(redis_url)

    def __call__(self) -> dict:
        with self.conn.cursor() as cur:
            cur.execute("""SELECT coalesce(sum(granted), 0), count(*), count(*) FILTER (WHERE status = 'running')
                           FROM campaign_runs WHERE campaign_id = %s""", (self.campaign_id,))
            granted, runs, running = cur.fetchone()
            cur.execute("SELECT count(*) FROM notifications WHERE campaign_id = %s AND status IN "
                        "('received', 'processing')", (self.campaign_id,))
            unprocessed = cur.fetchone()[0]
        from shared.dispatch import CAMPAIGNS, GRANTS

        return {"granted": int(granted), "runs": runs, "running": running, "unprocessed": unprocessed,
                "backlog": self.redis.llen(CAMPAIGNS) + self.redis.llen(GRANTS)}

    def max_notification_id(self) -> int:
        with self.conn.cursor() as cur:
            cur.execute("SELECT coalesce(max(id), 0) FROM notifications")
            return cur.fetchone()[0]

    def rows_after(self, notification_id: int) -> int:
        with self.conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM notifications WHERE id > %s", (notification_id,))
            return cur.fetchone()[0]

    def tasks_after(self, notification_id: int) -> int:
        """`process_notification` messages waiting in the `notifications` list for rows after `notification_id`
        (beat's own jobs queue there too: they are not counted)."""
        import base64

        from shared.dispatch import NOTIFICATIONS, PROCESS_NOTIFICATION

        count = 0
        for raw in self.redis.lrange(NOTIFICATIONS, 0, -1):
            message = json.loads(raw)
            if message.get("headers", {}).get("task") != PROCESS_NOTIFICATION:
                continue
            args = json.loads(base64.b64decode(message["body"]))[0]
            count += bool(args) and args[0] > notification_id
        return count

    def close(self) -> None:
        self.conn.close()
        self.redis.close()


def start_campaign(info: dict, customers: int, campaign_id: int) -> dict:
    """Create the campaign in the fake Optimove and post its EventTypeID 13 notifications, as Optimove would."""
    import requests

    spec = {"campaign_id": campaign_id, "channels": list(BUSY_CHANNELS), "customers_per_channel": customers,
            "overlap": BUSY_OVERLAP, "codes": list(BUSY_CODES), "multi_code_every": BUSY_MULTI_CODE_EVERY}
    with requests.Session() as session:
        created = session.post(f"{info['simulator']['optimove_url']}/_sim/campaigns", json=spec, timeout=60)
        created.raise_for_status()
        for channel in BUSY_CHANNELS:
            r = session.post(info["listener_url"], json={"EventTypeID": 13, "TimeStamp": "2026-11-27 10:00:00",
                                                         "CampaignID": campaign_id, "ChannelID": channel}, timeout=30)
            if r.status_code not in (200, 202):
                raise RuntimeError(f"listener answered {r.status_code}: {r.text[:300]}")
    return created.json()


def pause_notifications(redis_url: str) -> dict:
    """Tell every worker to stop consuming the `notifications` queue; which ones still do afterwards."""
    from celery import Celery

    from shared.dispatch import NOTIFICATIONS

    app = Celery("relay-bench", broker=redis_url, set_as_current=False)
    try:
        replies = app.control.cancel_consumer(NOTIFICATIONS, reply=True, timeout=5) or []
        queues = app.control.inspect(timeout=5).active_queues() or {}
    finally:
        app.close()
    return {"replies": len(replies), "workers": len(queues),
            "still_consuming": sorted(w for w, qs in queues.items() if any(q["name"] == NOTIFICATIONS for q in qs)),
            "campaign_worker_seen": any(any(q["name"] == "campaigns" for q in qs) for qs in queues.values())}


def niceness(groups: dict[str, list[int]]) -> dict[str, list[int]]:
    """The distinct CPU niceness values in each group's processes."""
    out = {}
    for name, roots in groups.items():
        values = set()
        for root in roots:
            for p in (process_tree(root) if root >= 0 else process_tree(-root)[:1]):
                try:
                    values.add(p.nice())
                except psutil.Error:
                    pass
        out[name] = sorted(values)
    return out


def autogroup_enabled() -> bool | None:
    """Whether the kernel schedules by autogroup (one per session, see sched(7)); None when it cannot say."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return None


def autogroup_nice(pid: int) -> int | None:
    """The nice value of the autogroup (session) of `pid` (`/proc/<pid>/autogroup`: "/autogroup-N nice K")."""
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def autogroups(groups: dict[str, list[int]]) -> dict[str, list[int]]:
    """The distinct autogroup nice values of each group's root processes."""
    return {name: sorted({n for pid in roots if (n := autogroup_nice(abs(pid))) is not None})
            for name, roots in groups.items()}


def set_autogroup_nice(groups: dict[str, list[int]]) -> list[str]:
    """Give each niced child of `relay up` an autogroup nice equal to its nice (what `relay up` would have to do
    for its niceness to count against web with autogroup scheduling on); what was set."""
    done = []
    for name, roots in groups.items():
        for pid in roots:
            try:
                nice = psutil.Process(pid).nice() if pid > 0 else 0
                if nice > 0:
                    Path(f"/proc/{pid}/autogroup").write_text(str(nice))
                    done.append(f"{name} {pid}: {nice}")
            except (OSError, psutil.Error) as exc:
                done.append(f"{name} {pid}: failed ({exc})")
    return done


def wait_for(what: str, condition, timeout: float, check) -> float:
    """Poll `condition()` every 0.2 s until it holds; seconds waited. `check()` raises when a process died."""
    t0 = time.monotonic()
    while not condition():
        check()
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)
    return round(time.monotonic() - t0, 1)


def run_busy(args, nice: int) -> dict:
    """Mode `busy`: `relay up --worker-nice <nice>` and the bare app; a big campaign; bare then relay measured
    while it runs; the stores checked; everything stopped and checked gone."""
    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-busy-"))
    py = sys.executable
    flags = gunicorn_flags(default_web_workers(), 1)  # what `relay up` runs `relay web` with (its defaults)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "OPTIMOVE_", "BONUS_", "SEND_", "FLOWER_", "PROMETHEUS_"))}
    env.update({"RELAY_LISTENER_TOKENS": TOKEN, "RELAY_LOG_LEVEL": "warning", "RELAY_SWEEP_AFTER": "3600",
                "PROMETHEUS_MULTIPROC_DIR": str(tmp / "metrics")})
    (tmp / "metrics").mkdir()
    up = RelayUp(tmp / "up", nice, env, tmp / "relay-up.log")
    with ExitStack() as stack:
        if args.keep_logs:
            print(f"busy (--worker-nice {nice}): logs in {tmp}", file=sys.stderr)
        else:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        stack.callback(up.stop)
        up.start()
        bare_port = free_port()
        bare = Server("bare", [py, "-m", "gunicorn", "--bind", f"127.0.0.1:{bare_port}", *flags,
                               "bench._bare_app:app"], env, bare_port, tmp / "bare.log")
        stack.callback(bare.stop)
        bare.start()
        t0 = time.monotonic()
        info = up.wait_ready()
        bare.wait_ready()
        up_ready_s = round(time.monotonic() - t0, 1)
        db_url, redis_url = up.store_urls()

        campaign_id = int(time.time()) % 10 ** 6 * 10 + 7
        probe = CampaignProbe(db_url, redis_url, campaign_id)
        stack.callback(probe.close)
        t0 = time.monotonic()
        created = start_campaign(info, args.busy_customers, campaign_id)
        expected = created["expected_triples"]
        wait_for("the campaign's notifications to be processed",
                 lambda: (lambda s: s["runs"] == len(BUSY_CHANNELS) and not s["unprocessed"])(probe()),
                 args.busy_timeout, up.check)
        paused = pause_notifications(redis_url)
        if paused["still_consuming"] or not paused["campaign_worker_seen"]:
            raise RuntimeError(f"could not pause the notifications queue: {paused}")
        wait_for("the campaign's first grants", lambda: probe()["granted"] > 0, args.busy_timeout, up.check)
        first_grant_s = round(time.monotonic() - t0, 1)
        settle_until = time.monotonic() + args.busy_settle  # past the first pages' claims, grants flowing
        wait_for("the campaign to settle", lambda: time.monotonic() >= settle_until, args.busy_settle + 5, up.check)
        groups = up.groups()
        up.track()
        autogroup_set = set_autogroup_nice(groups) if args.set_autogroup else []
        nices = niceness(groups)
        nices["bare"] = niceness({"bare": [bare.proc.pid]})["bare"]
        sessions = autogroups({**groups, "bare": [bare.proc.pid]})
        web_workers = len(process_tree(groups["server"][0])) - 1 if groups["server"] else 0
        start = probe()

        channel = int(time.time()) % 10 ** 9
        phase_ids = itertools.count(IDS_PER_PHASE, IDS_PER_PHASE)
        max_id = probe.max_notification_id()
        queued0 = probe.tasks_after(max_id)
        relay = Server("relay", [], env, up.port, tmp / "relay-up.log")  # measured only: `relay up` runs it
        results = {}
        for name, target, server_pid in (("bare", bare, bare.proc.pid), ("relay", relay, groups["server"][0])):
            roots = {"server": [server_pid], **{k: v for k, v in groups.items() if k != "server"}}
            results[name] = measure(target, args, channel, phase_ids, roots, probe=probe)
            up.check()
        end = probe()
        rows, queued = probe.rows_after(max_id), probe.tasks_after(max_id) - queued0
        up.track()
    # out of the stack: `relay up` stopped and its processes checked

    r, b = results["relay"], results["bare"]
    ratio = round(r["max_rps"] / b["max_rps"], 3) if b["max_rps"] else 0.0
    phases = [m[k] for m in (b, r) for k in ("campaign_at_max", "campaign_at_rate")]
    still_running = end["granted"] < expected
    return {
        "mode": "busy", "worker_nice": nice, "relay": r, "bare": b, "ratio": ratio, "rate": args.rate,
        "targets": {f"ratio>={TARGET_RATIO_BUSY}": ratio >= TARGET_RATIO_BUSY},
        "for_reference": {f"p99<={TARGET_P99_MS:g}ms@{args.rate:g}": r["p99_ms"] <= TARGET_P99_MS},
        "rows_stored": rows, "tasks_enqueued": queued,
        "consistent": rows == queued == r["accepted_202"],
        "workers_busy": still_running and all(ph["grants_per_s"] > 0 for ph in phases),
        "campaign": {"campaign_id": campaign_id, "channels": list(BUSY_CHANNELS),
                     "customers_per_channel": args.busy_customers, "expected_grants": expected,
                     "granted_at_start": start["granted"], "granted_at_end": end["granted"],
                     "still_running_at_end": still_running, "backlog_at_end": end["backlog"],
                     "seconds_to_first_grant": first_grant_s, "settle_s": args.busy_settle},
        "niceness": nices, "autogroup_enabled": autogroup_enabled(), "autogroup_nice": sessions,
        "autogroup_set_by_bench": autogroup_set, "notifications_consumer_paused": paused,
        "relay_up": {"command": up.command, "ready_s": up_ready_s, "web_workers": web_workers,
                     "stop_s": up.stop_seconds, "processes_tracked": len(up.seen),
                     "left_running_after_stop": up.leftovers},
        "setup": {"duration_s": args.duration, "connections": args.connections, "client_procs": args.client_procs,
                  "cpus": os.cpu_count(), "gunicorn": " ".join(flags[:6]),
                  "stores": "Postgres/Redis from DATABASE_URL/REDIS_URL" if os.environ.get("DATABASE_URL")
                  else "relay up's embedded Postgres (fsync on) and Redis (AOF everysec)"},
    }


def run(args) -> dict:
    """Every mode asked for, one after the other."""
    modes = []
    if args.mode in ("alone", "both"):
        modes.append(run_alone(args))
    if args.mode in ("busy", "both"):
        for nice in args.worker_nice:
            modes.append(run_busy(args, nice))
    exe = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    return {"modes": modes, "rate": args.rate,
            "command": " ".join(shlex.quote(a) for a in [exe, *sys.argv])}


# --- report -------------------------------------------------------------------------------------

OTHER_CPU_WARN = 25  # % of a core used by processes outside the bench before a phase counts as disturbed


def _other(cpu: dict) -> float:
    """CPU (% of a core) the machine used beyond the bench's own processes during one phase."""
    return cpu["machine"] - sum(v for k, v in cpu.items() if k != "machine")


def other_cpu(m: dict) -> float:
    """The most any phase of mode `m` saw used outside the bench."""
    return max(_other(m[name][phase]) for name in ("bare", "relay") for phase in ("cpu_pct_at_max", "cpu_pct_at_rate"))


def _mode_name(m: dict) -> str:
    if m["mode"] == "alone":
        return "alone"
    return f"busy, worker nice {m['worker_nice']}" + (" +ag" if m["autogroup_set_by_bench"] else "")


def _cpu_columns(m: dict) -> list[str]:
    return (["server", "load generator", "stores"] if m["mode"] == "alone"
            else ["server", "load generator", "stores", "workers", "realtime", "beat+flower+sim", "relay up"])


def report_mode(m: dict, rate: float) -> list[str]:
    """One mode's table: both targets, both phases, CPU by group."""
    s = m["setup"]
    cols = _cpu_columns(m)
    short = {"load generator": "load gen", "beat+flower+sim": "beat/flower/sim"}
    lines = [f"== {_mode_name(m)} ==",
             f"setup:   {s['cpus']} CPUs, {s['gunicorn']}, {s['connections']} connections, "
             f"{s['duration_s']:g}s per phase, {s['stores']}"]
    if m["mode"] == "busy":
        c, u, n = m["campaign"], m["relay_up"], m["niceness"]
        lines += [f"relay up: {u['command']} (web: {u['web_workers']} gunicorn workers; ready in {u['ready_s']}s)",
                  f"niceness: " + ", ".join(f"{k} {'/'.join(map(str, v)) or '-'}" for k, v in n.items()),
                  f"autogroup scheduling {'on' if m['autogroup_enabled'] else 'off'}; autogroup nice of each "
                  f"group's sessions: " + ", ".join(f"{k} {'/'.join(map(str, v)) or '-'}"
                                                   for k, v in m["autogroup_nice"].items())
                  + (" (set by the bench: --set-autogroup)" if m["autogroup_set_by_bench"] else ""),
                  f"campaign {c['campaign_id']}: {len(c['channels'])} channels x {c['customers_per_channel']} "
                  f"customers, {c['expected_grants']} grants; first grant {c['seconds_to_first_grant']}s after "
                  f"creation, phases from {c['settle_s']:g}s later; granted {c['granted_at_start']} when they "
                  f"began, {c['granted_at_end']} when "
                  f"they ended ({'still running' if c['still_running_at_end'] else 'FINISHED before the end'})"]
    lines.append(f"{'target':<7}{'max req/s':>11}{'@' + format(rate, 'g') + '/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
                 f"{'max ms':>9}{'errors':>8}{'cpu ms/req':>12}   CPU% of a core at max / at {rate:g}/s: "
                 + " / ".join(short.get(c, c) for c in cols) + " / machine"
                 + ("   grants/s at max / at rate" if m["mode"] == "busy" else ""))
    for name in ("bare", "relay"):
        r = m[name]
        cpu = [" / ".join(f"{r[phase].get(c, float('nan')):.0f}" for c in [*cols, "machine"])
               for phase in ("cpu_pct_at_max", "cpu_pct_at_rate")]
        line = (f"{name:<7}{r['max_rps']:>11.1f}{r['rate_achieved']:>10.1f}{r['p50_ms']:>9.2f}"
                f"{r['p99_ms']:>9.2f}{r['max_ms']:>9.2f}{r['errors']:>8}{r['server_cpu_ms_per_req'] or 0:>12.2f}   "
                f"{cpu[0]}  |  {cpu[1]}")
        if m["mode"] == "busy":
            line += f"   {r['campaign_at_max']['grants_per_s']:.0f} / {r['campaign_at_rate']['grants_per_s']:.0f}"
        lines.append(line)
    lines.append(f"(cpu ms/req: server CPU per request at max throughput; machine = {100 * s['cpus']}% "
                 "when every core is busy)")
    for name in ("bare", "relay"):
        for phase in ("cpu_pct_at_max", "cpu_pct_at_rate"):
            other = _other(m[name][phase])
            if other > OTHER_CPU_WARN:
                lines.append(f"WARNING: other processes used ~{other:.0f}% of a core during {name} "
                             f"{phase.removeprefix('cpu_pct_')}: figures are lower bounds, rerun on a quiet machine")
    if m["mode"] == "busy" and m["autogroup_enabled"] and max(m["niceness"]["workers"] or [0]) > 0 \
            and not max(m["autogroup_nice"]["workers"] or [0]):
        lines.append("WARNING: autogroup scheduling is on and every `relay up` child has a session (autogroup) of "
                     "its own at autogroup nice 0: the workers' niceness only ranks them inside their own session, "
                     "so against web it changes nothing (sched(7)); --set-autogroup shows what it would buy")
    lines.append(f"ratio relay/bare max req/s: {m['ratio']:.3f}")
    for name, met in m["targets"].items():
        lines.append(f"target {name}: {'met' if met else 'MISSED'}")
    for name, met in m.get("for_reference", {}).items():
        lines.append(f"(for reference, the alone target {name}: {'would be met' if met else 'not met'})")
    lines.append(f"relay 202s: {m['relay']['accepted_202']}, notifications rows added: {m['rows_stored']}, "
                 f"tasks enqueued: {m['tasks_enqueued']} -> {'consistent' if m['consistent'] else 'MISMATCH'}")
    if m["mode"] == "busy":
        c, u = m["campaign"], m["relay_up"]
        lines.append(f"workers busy throughout: {'yes' if m['workers_busy'] else 'NO'} (grants recorded in every "
                     f"phase and the campaign still running after the last; {c['backlog_at_end']} campaign/grant "
                     f"tasks queued at the end){'' if m['workers_busy'] else ': raise --busy-customers'}")
        lines.append(f"relay up stopped in {u['stop_s']}s; of the {u['processes_tracked']} processes it ran, left "
                     f"running: {', '.join(u['left_running_after_stop']) or 'none'}")
    return lines


def report(res: dict) -> str:
    """A readable table per mode, then one summary line per mode."""
    rate = res["rate"]
    lines = [f"command: {res['command']}", ""]
    for m in res["modes"]:
        lines += report_mode(m, rate) + [""]
    lines.append(f"{'mode':<22}{'relay req/s':>12}{'bare req/s':>11}{'ratio':>7}{'relay p50/p99':>18}"
                 f"{'bare p50/p99':>15}{'workers CPU%':>14}{'grants/s':>13}{'other CPU%':>12}  targets")
    lines.append(f"{'':<22}{'':>12}{'':>11}{'':>7}{'ms @' + format(rate, 'g') + '/s':>18}{'':>15}"
                 f"{'max/@rate':>14}{'max/@rate':>13}{'max':>12}")
    for m in res["modes"]:
        r, b = m["relay"], m["bare"]
        workers = grants = "-"
        if m["mode"] == "busy":
            workers = f"{r['cpu_pct_at_max']['workers']:.0f}/{r['cpu_pct_at_rate']['workers']:.0f}"
            grants = f"{r['campaign_at_max']['grants_per_s']:.0f}/{r['campaign_at_rate']['grants_per_s']:.0f}"
        targets = ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in m["targets"].items())
        lat = [f"{x['p50_ms']:.2f}/{x['p99_ms']:.2f}" for x in (r, b)]
        lines.append(f"{_mode_name(m):<22}{r['max_rps']:>12.1f}{b['max_rps']:>11.1f}{m['ratio']:>7.3f}"
                     f"{lat[0]:>18}{lat[1]:>15}{workers:>14}{grants:>13}{other_cpu(m):>12.0f}  {targets}")
    if any(m["mode"] == "busy" for m in res["modes"]):
        lines.append("(workers CPU%: the campaign worker's process tree, % of one core, during the relay's phases; "
                     "grants/s: recorded by the campaign during them)")
    lines.append(f"(other CPU%: the most, in % of one core, that processes outside the bench used in any phase of the "
                 f"mode; above {OTHER_CPU_WARN}% the mode's figures are lower bounds)")
    return "\n".join(lines)


def _nice_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("comma-separated integers 0..19") from None
    if not values or not all(0 <= v <= 19 for v in values):
        raise argparse.ArgumentTypeError("comma-separated integers 0..19")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("alone", "busy", "both"), default="both",
                        help="alone: the listener on its own; busy: under `relay up` while a campaign runs; both")
    parser.add_argument("--busy", action="store_const", dest="mode", const="busy", help="same as --mode busy")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement phase")
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s of the latency phase")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections of the load generator")
    parser.add_argument("--client-procs", type=int, default=1,
                        help="load generator processes (the connections are split between them)")
    parser.add_argument("--web-workers", type=int, default=default_web_workers(),
                        help="alone: gunicorn workers of both servers (default: two per CPU, as `relay web`; "
                             "busy: always `relay up`'s)")
    parser.add_argument("--web-threads", type=int, default=1,
                        help="alone: gunicorn threads per worker of both servers (busy: `relay up`'s, 1)")
    parser.add_argument("--worker-nice", type=_nice_list, default=[10],
                        help="busy: `relay up --worker-nice`; a comma-separated list runs one busy block per value "
                             "(e.g. 10,0)")
    parser.add_argument("--busy-customers", type=int, default=500_000,
                        help="busy: customers per channel of the campaign (3 channels; enough to outlast the phases)")
    parser.add_argument("--busy-settle", type=float, default=15.0,
                        help="busy: seconds from the campaign's first grant to the first phase")
    parser.add_argument("--busy-timeout", type=float, default=300.0,
                        help="busy: seconds to wait for the campaign's notifications and first grants")
    parser.add_argument("--set-autogroup", action="store_true",
                        help="busy: also give each niced `relay up` child's session that autogroup nice "
                             "(/proc/<pid>/autogroup), as `relay up` would have to for its niceness to count against "
                             "web when the kernel schedules by autogroup")
    parser.add_argument("--keep-logs", action="store_true", help="busy: keep the temp folder with relay up's log")
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
