"""Campaign throughput end to end (flow 3 grants, flow 1 sends, flow 4 conditional runs) against the raw
insert limit of the same rows, side by side in one run.

    .venv/bin/python bench/campaign.py [--role bonus|send|conditional] [--customers N]
                                       [--sizes 100000,1000000] [--channels 3] [--workers 2] [--json]

Starts Postgres and Redis (embedded under a temp folder unless DATABASE_URL/REDIS_URL are set), the
simulator (`python -m simulator serve`: fake Optimove, bonus system and send service) and the relay's
`web` and `worker` processes (and `beat` for --role conditional, whose last statuses wait for its tick),
each in its own session with its log in a file. After a small warm-up campaign, for every size N in
`--sizes` (customers per channel) it first inserts the campaign's rows raw, then runs the campaign:

* `--role bonus` (flow 3, default sizes 100000,300000): `--channels` (default 3; 504, 505, …) with
  50 % overlap (consecutive channels share half their customers: 2N unique customers with 3 channels,
  N with 1), every 2nd customer holding two promo codes (WB23 and NV10). One EventTypeID 13 per
  channel; time runs from the first notification until Postgres records the last grant `granted`
  (the runs' counters, polled every 20 ms).
* `--role send` (flow 1, default 100000): send channels 610, 611, … (role `send`, attributes Email and
  Country, in the channel config the bench writes), no overlap, templates 14/15/16, every
  ScheduledTime due now, attributes half in list and half in string form, the batch send adapter
  (SEND_BATCH_SIZE = `--batch-size`) against the fake send service. Time runs until Postgres records
  the last send `sent`; the fake send service's receive times of the first and last send are
  reported too.
* `--role conditional` (flow 4, default 100000): a conditional campaign of N customers without
  channels (as Optimove sends it; `--channels` does not apply), codes as for bonus, one EventTypeID 5
  with ClearanceRequiredBy `--clearance-in` seconds ahead (default 600, so the deadline never cuts
  the run). The relay pages GetProcessedCampaignCustomers, grants, and reports every customer's
  status with UpdateCustomerPromotionStatus. Time runs until Postgres marks the run `done`, which
  it does once every status is reported (the end-to-end test waits for the same: every customer
  reported); when the last grant was recorded and when the fake Optimove received the last report
  are shown too.

Per size it reports rows fetched (the rows the relay paged from Optimove, the runs' `fetched`
counters: channels x N, or N for conditional), unique customers and ledger rows (grants or sends),
each per second end to end, and µs per fetched row; when 10 %, 20 %, … 100 % of the ledger rows were
recorded; and the CPU seconds each process tree used meanwhile (worker, web, beat, simulator, Postgres,
Redis, this bench) with "other": the rest of the machine (other people's processes). When "other"
exceeds a quarter of a core the size's figures are flagged as disturbed. Postgres is CHECKPOINTed
before each raw insert and each campaign, so neither starts by writing the other's dirty pages.

The raw limit is the same rows (all channels, in channel order, one Optimove page per statement and
commit, each page built outside the timing) inserted with `execute_values … ON CONFLICT DO NOTHING
RETURNING id` into a fresh table with the same unique constraint, on the same server, in one
connection. Grants (bonus, conditional): the (campaign, customer, promo code, channel, source) rows
in the bench's narrow grants table (as before; the relay-shaped row with idempotency key, scope and
ActionID is measured next to it for reference). Sends: the relay's own parsed pages, keys and
columns in a fresh sends-shaped table (no secondary indexes); the relay's own `INSERT … SELECT FROM
unnest … ON CONFLICT` shape is measured next to it for reference.

Ratios, all from the same run:
* fetch ratio = rows fetched/s end to end ÷ the raw insert rate of those same rows (fetched rows ÷
  seconds the raw insert took for all their ledger rows; a grant page's 10,000 fetched rows are 15,000
  ledger rows in both): equal to raw seconds ÷ end-to-end seconds. Target (issue 10): >= 0.8 at every
  size, for grants and for sends.
* customer ratio = unique customers/s ÷ raw ledger rows/s: the bench's former ratio, kept for
  comparison with earlier figures (its former 0.2 target was the bench's own, not the issue's).

Other targets (issue 10): per-row cost growth (µs per fetched row at the largest size ÷ at the
smallest) <= 1.2x; worker RSS (the whole `relay worker` tree, sampled with psutil every 0.2 s) < 300 MB
at every size and flat: its max <= its value once 10 % of the ledger rows are recorded (the first pages
done) + 20 MB.

Exactness (any failure makes the exit code 1; missed performance targets do not):
* bonus and conditional: every expected (customer, promo code) applied exactly once at the fake bonus
  system, read entry by entry (100,000 customers per read), nothing rejected or unexpected; its
  counters moved by exactly the expected grants, no duplicate grants; Postgres holds exactly the
  expected grants, all `granted`; runs `done`; rows fetched = expected.
* conditional, also: the fake Optimove holds a status for every customer, all true, none turned
  false, none received after ClearanceRequiredBy, no report call above 10,000 customers; the run
  counted N true, 0 false, 0 expired.
* send: each expected (channel, customer, template) applied exactly once at the fake send service
  with the expected attributes and ScheduledTime, none early, none rejected, nothing else; Postgres
  holds exactly the expected rows, all `sent`; every run `done`; rows fetched = expected.

The fake Optimove computes every page from the campaign spec when asked (simulator/campaigns.py), so
a 1,000,000-customer campaign is never held in memory there; the fake peers' ledgers and the fake
Optimove's promotion statuses do keep an entry per grant, send or customer (they are the checks).
`--sizes 100000,1000000 --channels 1` takes 4-5 minutes per role on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import psycopg2
import requests
from psycopg2.extras import execute_values

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import log_tail, start_stores, stop_group  # noqa: E402
from cli.embedded import free_port, wait_for_port  # noqa: E402
from simulator import campaigns  # noqa: E402
from simulator.conditional_driver import conditional_spec, optimove_time  # noqa: E402
from simulator.optimove import MAX_PROMOS_UPDATED  # noqa: E402

TOKEN = "bench-listener-token-0123456789abcdef"
ADMIN_PASSWORD = "bench-admin-password"
API_KEY = "bench-sim-api-key-0123456789"
ROLES = ("bonus", "send", "conditional")
CHANNELS = (504, 505, 506)
CODES = ("WB23", "NV10")
MULTI_CODE_EVERY = 2
OVERLAP = 0.5
TARGET_FETCH_RATIO = 0.8         # issue 10: rows fetched/s end to end >= 0.8 x raw insert rate of the same rows
FORMER_CUSTOMER_RATIO = 0.2      # the bench's former target on unique customers/s / raw rows/s (not the issue's)
TARGET_RSS_MB = 300
TARGET_GROWTH = 1.2              # µs per fetched row, largest size / smallest
TARGET_RSS_FLAT_MB = 20          # max tree RSS <= its value once RSS_WARM_FRACTION of the ledger rows are in + this
RSS_WARM_FRACTION = 0.1
RSS_INTERVAL = 0.2
POLL_INTERVAL = 0.02
BONUS_SIZES = (100_000, 300_000)
BONUS_CUSTOMERS = 300_000       # with --sizes ''
WARMUP_CUSTOMERS = 2000
# --role send (flow 1)
SEND_CHANNELS = (610, 611, 612)
SEND_TEMPLATES = (14, 15, 16)
SEND_ATTRIBUTES = ("Email", "Country")
SEND_ATTRIBUTE_FORM = "mixed"    # odd customers' attributes as one ';'-joined string, even ones as a list
SEND_CUSTOMERS = 100_000
SEND_SOURCE = "scheduled"
# --role conditional (flow 4)
CONDITIONAL_CUSTOMERS = 100_000
CONDITIONAL_SOURCE = "conditional"
CLEARANCE_IN = 600.0             # seconds from EventTypeID 5 to ClearanceRequiredBy
OTHER_CPU_WARN = 0.25           # warn when other processes used more than this share of a core during a campaign
PEER_CHUNK = 100_000             # customer numbers per read of a fake peer's entries (prefix C000..)
# the yardstick (target) and the reference raw insert of each role
RAW_METHODS = {"bonus": ("execute_values", "relay_columns"), "conditional": ("execute_values", "relay_columns"),
               "send": ("execute_values", "unnest")}


# --- processes ----------------------------------------------------------------------------------

class Group:
    """A process started in its own session, output to a log file; `stop` kills the whole group."""

    def __init__(self, name: str, argv: list[str], env: dict, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def check(self) -> None:
        """Raise with the log's tail if the process has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}\n"
                               f"--- {self.log_path} (tail) ---\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL whatever is left after a grace period."""
        stop_group(self.proc, 10)


def start_simulator(tmp: Path, stack: ExitStack, rate_limit: str, name: str = "simulator") -> dict:
    """`python -m simulator serve` on free ports; its URLs from the ready file."""
    ready = tmp / f"{name}.ready"
    env = {**os.environ, "SIMULATOR_API_KEY": API_KEY, "PYTHONUNBUFFERED": "1"}
    sim = Group(name, [sys.executable, "-m", "simulator", "serve", "--optimove-port", "0",
                              "--bonus-port", "0", "--ready-file", str(ready), "--rate-limit", rate_limit],
                env, tmp)
    stack.callback(sim.stop)
    deadline = time.monotonic() + 30
    while not ready.exists():
        sim.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"simulator not ready in 30 s\n{sim.tail()}")
        time.sleep(0.05)
    urls = json.loads(ready.read_text())
    urls["pid"] = sim.proc.pid
    return urls


def relay_env(args, db_url: str, redis_url: str, sim: dict, tmp: Path) -> dict:
    """The relay processes' environment: stores, simulator, limits, bench settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "OPTIMOVE_", "BONUS_", "SEND_", "DATABASE_URL", "REDIS_URL"))}
    env.update({
        "DATABASE_URL": db_url, "REDIS_URL": redis_url, "RELAY_LISTENER_TOKENS": TOKEN,
        "RELAY_ADMIN_PASSWORD": ADMIN_PASSWORD, "RELAY_LOG_LEVEL": args.log_level,
        "RELAY_LOG_FORMAT": "console",  # bench/realtime.py reads task times from the worker's text log
        "OPTIMOVE_API_URL": sim["optimove_url"], "OPTIMOVE_API_KEY": API_KEY,
        "OPTIMOVE_RATE_LIMIT": args.rate_limit, "OPTIMOVE_PAGE_SIZE": str(args.page_size),
        "BONUS_ADAPTER": "http", "BONUS_URL": sim["bonus_url"], "BONUS_MODE": "batch",
        "BONUS_BATCH_SIZE": str(args.batch_size), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp / "metrics"),
    })
    if getattr(args, "release_interval", None) is not None:
        env["RELAY_RELEASE_INTERVAL"] = str(args.release_interval)
    (tmp / "metrics").mkdir(exist_ok=True)
    return env


class Relay:
    """The relay's processes: web's base URL, the worker(s) (whose RSS is sampled) and every process to watch."""

    def __init__(self, base: str, workers: list[Group], others: list[Group]):
        self.base, self.workers, self.watched = base, workers, [*workers, *others]
        self.cpu = CpuMeter({"worker": [w.proc.pid for w in workers],
                             **{g.name: [g.proc.pid] for g in others}})

    def check(self) -> None:
        """Raise with its log's tail if a relay process has exited."""
        for group in self.watched:
            group.check()

    def tails(self) -> str:
        return "\n".join(f"--- {g.name} (tail) ---\n{g.tail()}" for g in self.watched)


def launch_relay(args, env: dict, tmp: Path, stack: ExitStack, beat: bool = False) -> Relay:
    """`relay web` (ready once /readyz answers), `--worker-processes` x `relay worker`, and with `beat`
    `relay beat` (flow 4 reports its last statuses and ends its runs on beat's tick)."""
    port = free_port()
    web = Group("web", [sys.executable, "-m", "cli.main", "web", "--port", str(port), "--workers", "2",
                        "--threads", "4"], env, tmp)
    stack.callback(web.stop)
    workers, others = [], []
    for i in range(args.worker_processes):
        w = Group(f"worker{i}", [sys.executable, "-m", "cli.main", "worker", "--concurrency", str(args.workers)],
                  env, tmp)
        stack.callback(w.stop)
        workers.append(w)
    if beat:
        b = Group("beat", [sys.executable, "-m", "cli.main", "beat", "--schedule-file", str(tmp / "beat-schedule")],
                  env, tmp)
        stack.callback(b.stop)
        others.append(b)
    wait_for_port(port, 60, web.proc)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        web.check()
        try:
            if requests.get(base + "/readyz", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"web not ready\n{web.tail()}")
        time.sleep(0.1)
    return Relay(base, workers, [web, *others])


def start_relay(args, env: dict, tmp: Path, stack: ExitStack) -> tuple[str, list[Group]]:
    """`launch_relay` without beat, as (web's base URL, the workers) (bench/realtime.py starts the relay so)."""
    relay = launch_relay(args, env, tmp, stack)
    return relay.base, relay.workers


# --- measurement --------------------------------------------------------------------------------

class RssSampler:
    """Samples the worker process trees every `RSS_INTERVAL`: max single pool child and max tree sum."""

    def __init__(self, workers: list[Group]):
        self.roots = [w.proc.pid for w in workers]
        self.child_peak = 0
        self.tree_peak = 0
        self.samples = 0
        self.history: list[tuple[float, int, int]] = []  # (monotonic, tree sum over roots, largest pool child)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(RSS_INTERVAL):
                return

    def sample(self) -> None:
        tree_sum = child_max = 0
        for pid in self.roots:
            total = 0
            try:
                root = psutil.Process(pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in tree:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                if p.pid != pid:
                    self.child_peak = max(self.child_peak, rss)
                    child_max = max(child_max, rss)
            self.tree_peak = max(self.tree_peak, total)
            tree_sum += total
        self.samples += 1
        self.history.append((time.monotonic(), tree_sum, child_max))


class CpuMeter:
    """CPU seconds (user + system) of named process trees: each root, its live descendants and the children
    they reaped (a Postgres backend that exited is in the postmaster's children times)."""

    def __init__(self, roots: dict[str, list[int]]):
        self.roots = dict(roots)

    def add(self, name: str, pids: list[int]) -> None:
        self.roots[name] = list(pids)

    def snapshot(self) -> dict[str, float]:
        """CPU seconds so far per named tree, of this bench process ("bench") and of the machine ("_busy")."""
        system, me = psutil.cpu_times(), psutil.Process().cpu_times()
        out = {"_busy": sum(getattr(system, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal")),
               "bench": me.user + me.system}
        for name, pids in self.roots.items():
            total = 0.0
            for pid in pids:
                try:
                    root = psutil.Process(pid)
                    tree = [root, *root.children(recursive=True)]
                except psutil.Error:
                    continue
                for p in tree:
                    try:
                        t = p.cpu_times()
                    except psutil.Error:
                        continue
                    total += t.user + t.system + t.children_user + t.children_system
            out[name] = total
        return out

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """CPU seconds per tree between two snapshots, and "other": what the rest of the machine used meanwhile
        (other people's processes, the kernel's own threads)."""
        out = {name: round(after[name] - before.get(name, 0.0), 2) for name in after if name != "_busy"}
        out["other"] = round(max(0.0, after["_busy"] - before["_busy"] - sum(out.values())), 2)
        return out


class Deciles:
    """Seconds from `started` at which a counter of the runs reached 10 %, 20 %, … 100 % of `expected`."""

    def __init__(self, key: str, expected: int, started: float):
        self.key, self.expected, self.started = key, expected, started
        self.seconds: list[float] = []

    def update(self, totals: dict, now: float) -> None:
        while len(self.seconds) < 10 and totals[self.key] >= self.expected * (len(self.seconds) + 1) / 10:
            self.seconds.append(round(now - self.started, 2))


def rss_profile(history: list[tuple[float, int, int]], warm_at: float) -> dict:
    """Worker tree RSS (and largest pool child) at start, once warm (first sample at/after `warm_at`),
    max and end, in MB; `growth_after_warm_mb` = tree max - tree when warm; every sample (JSON only)."""
    mb = lambda b: round(b / 2 ** 20, 1)  # noqa: E731
    warm = next((h for h in history if h[0] >= warm_at), history[-1])
    tree_max, child_max = max(h[1] for h in history), max(h[2] for h in history)
    return {"tree_start_mb": mb(history[0][1]), "tree_warm_mb": mb(warm[1]), "tree_max_mb": mb(tree_max),
            "tree_end_mb": mb(history[-1][1]), "child_start_mb": mb(history[0][2]), "child_warm_mb": mb(warm[2]),
            "child_max_mb": mb(child_max), "child_end_mb": mb(history[-1][2]),
            "growth_after_warm_mb": mb(tree_max - warm[1]), "samples": len(history),
            "tree_mb_by_s": [[round(t - history[0][0], 1), mb(tree)] for t, tree, _ in history]}


def run_totals(cur, campaign_id: int) -> dict:
    """The campaign's runs: counters summed, and how many runs in each status."""
    cur.execute("""SELECT coalesce(sum(fetched), 0), coalesce(sum(granted), 0), coalesce(sum(sent), 0),
                          coalesce(sum(reported_true), 0), coalesce(sum(reported_false), 0),
                          coalesce(sum(expired), 0), count(*)
                   FROM campaign_runs WHERE campaign_id = %s""", (campaign_id,))
    fetched, granted, sent, true, false, expired, runs = cur.fetchone()
    cur.execute("SELECT status, count(*) FROM campaign_runs WHERE campaign_id = %s GROUP BY status", (campaign_id,))
    return {"fetched": int(fetched), "granted": int(granted), "sent": int(sent), "reported_true": int(true),
            "reported_false": int(false), "expired": int(expired), "runs": int(runs),
            "runs_by_status": dict(cur.fetchall())}


def settled_runs(cur, campaign_id: int, runs: int, wait: float = 30.0) -> dict:
    """`run_totals` once all `runs` runs are `done` (or after `wait` seconds): the end of a run is committed
    after the settle transaction that recorded its last row."""
    deadline = time.monotonic() + wait
    while True:
        totals = run_totals(cur, campaign_id)
        if totals["runs_by_status"] == {"done": runs} or time.monotonic() > deadline:
            return totals
        time.sleep(0.2)


def fire(session, listener: str, campaign_id: int, channels) -> None:
    """Post the campaign's EventTypeID 13 for each channel, as Optimove would."""
    for channel in channels:
        r = session.post(listener, json={"EventTypeID": 13, "TimeStamp": "2026-11-27 10:00:00",
                                         "CampaignID": campaign_id, "ChannelID": channel}, timeout=30)
        if r.status_code not in (200, 202):
            raise RuntimeError(f"listener answered {r.status_code}: {r.text[:300]}")


def wait_for(cur, relay: Relay, campaign_id: int, done, timeout: float, what: str, progress=None) -> float:
    """Poll the campaign's runs every POLL_INTERVAL until `done(totals)`; return the monotonic time it was
    seen. `progress(totals, now)` is called on every poll."""
    started = time.monotonic()
    while True:
        totals = run_totals(cur, campaign_id)
        now = time.monotonic()
        if progress is not None:
            progress(totals, now)
        if done(totals):
            return now
        if now - started > timeout:
            raise TimeoutError(f"campaign {campaign_id}: not {what} after {timeout:.0f}s: {totals}")
        relay.check()
        time.sleep(POLL_INTERVAL)


def checkpoint(db_url: str) -> None:
    """CHECKPOINT, so that the raw insert and the campaign each start with no dirty pages or WAL of the
    previous measurement to write; skipped without the privilege (a DATABASE_URL of a plain user)."""
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("CHECKPOINT")
    except psycopg2.Error:
        pass
    finally:
        conn.close()


# --- grants (flow 3, flow 4) ---------------------------------------------------------------------

def bonus_campaign_spec(campaign_id: int, channels: tuple[int, ...], n: int) -> dict:
    return campaigns.validate_spec({"campaign_id": campaign_id, "channels": list(channels), "customers_per_channel": n,
                                    "overlap": OVERLAP, "codes": list(CODES), "multi_code_every": MULTI_CODE_EVERY})


def conditional_campaign_spec(campaign_id: int, n: int) -> dict:
    return campaigns.validate_spec(conditional_spec(campaign_id, n, CODES, MULTI_CODE_EVERY))


def check_grants(session: requests.Session, ledger_url: str, spec: dict) -> dict:
    """Every expected grant of `spec` at the fake bonus system: each (customer, code) of the audience applied
    exactly once, nothing rejected, nothing else (campaign grants carry no notification id).

    Reads the campaign's entries PEER_CHUNK customer numbers at a time (prefix C000, C001, …), so a million
    customers' entries are never one response. The audience must be customer numbers 0 .. unique - 1.
    """
    unique = campaigns.unique_customers(spec)
    if unique and campaigns.audience_numbers(spec, unique - 1, 1) != [unique - 1]:
        raise ValueError("check_grants needs an audience of customer numbers 0 .. unique - 1")
    have = bytearray(unique)   # codes applied per customer number
    out = {"entries": 0, "applied": 0, "duplicates": 0, "rejected": 0, "unexpected": 0, "examples": []}
    for block in range((unique - 1) // PEER_CHUNK + 1 if unique else 0):
        r = session.get(ledger_url, params={"full": 1, "campaign_id": spec["campaign_id"],
                                            "customer_prefix": f"C{block:03d}"}, timeout=600)
        r.raise_for_status()
        for entry in r.json()["entries"]:
            out["entries"] += 1
            _, customer, code, notification = entry["key"]
            number = campaigns.customer_number(customer)
            if (not 0 <= number < unique or notification is not None
                    or code not in campaigns.promo_codes_for(spec, number)):
                out["unexpected"] += 1
                out["examples"].append(f"unexpected {entry['key']}")
                continue
            applications = entry["applications"]
            if applications:
                out["applied"] += 1
                have[number] = min(255, have[number] + 1)
            out["duplicates"] += max(0, applications - 1)
            if entry["rejections"]:
                out["rejected"] += 1
                out["examples"].append(f"rejected {entry['key']}")
    every, codes = spec["multi_code_every"], len(spec["codes"])
    missing = 0
    for number in range(unique):
        want = codes if every > 0 and number % every == 0 else 1
        missing += max(0, want - have[number])
    out["missing"] = missing
    out["examples"] = out["examples"][:5]
    return out


def run_bonus_campaign(relay: Relay, sim: dict, db_url: str, campaign_id: int, n: int, timeout: float,
                       channels: tuple[int, ...]) -> dict:
    """Create the campaign in the fake Optimove, fire the notifications (one per channel), wait for the last
    grant, check."""
    session = requests.Session()
    spec = bonus_campaign_spec(campaign_id, channels, n)
    created = session.post(f"{sim['optimove_url']}/_sim/campaigns", json=spec, timeout=30)
    created.raise_for_status()
    created = created.json()
    expected, unique = created["expected_triples"], created["unique_customers"]
    ledger_url = f"{sim['bonus_admin_url']}/_sim/ledger"
    before = session.get(ledger_url, timeout=30).json()
    listener = f"{relay.base}/optimove/events?token={TOKEN}"
    warm_target = max(1, int(RSS_WARM_FRACTION * expected))
    marks: dict[str, float] = {}

    def progress(totals, now):
        deciles.update(totals, now)
        if "warm" not in marks and totals["granted"] >= warm_target:
            marks["warm"] = now

    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        with RssSampler(relay.workers) as rss, conn.cursor() as cur:
            cpu_before = relay.cpu.snapshot()
            started = time.monotonic()
            deciles = Deciles("granted", expected, started)
            fire(session, listener, campaign_id, channels)
            ended = wait_for(cur, relay, campaign_id, lambda t: t["granted"] >= expected, timeout, "granted",
                             progress)
            seconds = ended - started
            cpu = CpuMeter.spent(cpu_before, relay.cpu.snapshot())
        rss.sample()  # the end
        profile = rss_profile(rss.history, marks.get("warm", time.monotonic()))
        with conn.cursor() as cur:  # checks, outside the timing
            totals = settled_runs(cur, campaign_id, len(channels))
            cur.execute("SELECT status, count(*) FROM grants WHERE campaign_id = %s GROUP BY status", (campaign_id,))
            by_status = dict(cur.fetchall())
    finally:
        conn.close()
    after = session.get(ledger_url, timeout=30).json()
    peer = check_grants(session, ledger_url, spec)
    delta = {name: after[name] - before[name] for name in ("applied", "unique_triples", "duplicate_grants", "rejected")}
    expected_fetched = n * len(channels)
    ok = (delta == {"applied": expected, "unique_triples": expected, "duplicate_grants": 0, "rejected": 0}
          and peer["applied"] == expected and peer["missing"] == peer["duplicates"] == peer["rejected"] == 0
          and peer["unexpected"] == 0 and by_status == {"granted": expected}
          and totals["runs_by_status"] == {"done": len(channels)} and totals["fetched"] == expected_fetched)
    return {
        "customers_per_channel": n, "channels": list(channels), "rows_fetched": totals["fetched"],
        "expected_rows_fetched": expected_fetched, "unique_customers": unique, "ledger_rows": expected,
        "seconds": round(seconds, 3), "deciles_s": deciles.seconds, "cpu_s": cpu, "rss": profile, "peer": peer,
        "peer_counters_delta": delta,
        "postgres_by_status": by_status, "runs": totals, "ok": ok,
    }


def run_campaign(base: str, sim: dict, db_url: str, workers: list[Group], campaign_id: int, n: int, timeout: float,
                 channels: tuple[int, ...] = CHANNELS) -> dict:
    """`run_bonus_campaign` for a relay started by `start_relay` (bench/realtime.py's warm-up)."""
    return run_bonus_campaign(Relay(base, workers, []), sim, db_url, campaign_id, n, timeout, channels)


def granted_so_far(cur, campaign_id: int) -> int:
    """Grants recorded `granted` for the campaign, from the runs' counters (updated in the settle transaction)."""
    return run_totals(cur, campaign_id)["granted"]


def grant_pages(spec: dict, page_size: int):
    """Per Optimove page, in channel order, (channel, (customer, code, ActionID) claims) as the relay parses
    them: GetCustomerExecutionDetailsByCampaign pages per channel, or GetProcessedCampaignCustomers pages
    of a conditional campaign (channel None)."""
    from shared.flows.grants import codes_per_customer

    n = spec["customers_per_channel"]
    if spec["conditional"]:
        for skip in range(0, campaigns.unique_customers(spec), page_size):
            yield None, codes_per_customer(campaigns.processed_rows(spec, skip, page_size))
        return
    for channel in spec["channels"]:
        for skip in range(0, n, page_size):
            yield channel, codes_per_customer(campaigns.channel_rows(spec, channel, skip, page_size))


def raw_grant_insert_rate(db_url: str, spec: dict, page_size: int, source: str) -> dict:
    """Rows/s of `execute_values … ON CONFLICT DO NOTHING RETURNING id` of the campaign's (customer, code) rows
    in the bench's narrow grants table, one page per statement and commit, fresh table; only the statements
    and commits are timed."""
    campaign_id = spec["campaign_id"]
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS bench_raw_grants")
            cur.execute("""
                CREATE TABLE bench_raw_grants (
                    id bigserial PRIMARY KEY, campaign_id bigint NOT NULL, customer_id text NOT NULL,
                    promo_code text NOT NULL, channel_id bigint, run_id bigint, source text NOT NULL,
                    status text NOT NULL DEFAULT 'claimed', attempts integer NOT NULL DEFAULT 0,
                    reference text, reason text, created_at timestamptz NOT NULL DEFAULT now(),
                    updated_at timestamptz NOT NULL DEFAULT now(),
                    CONSTRAINT bench_raw_once UNIQUE (campaign_id, customer_id, promo_code))""")
            conn.commit()
            rows = inserted = 0
            seconds = 0.0
            for channel, claims in grant_pages(spec, page_size):
                page = [(campaign_id, customer, code, channel, None, source) for customer, code, *_ in claims]
                t0 = time.monotonic()
                got = execute_values(cur, """
                    INSERT INTO bench_raw_grants (campaign_id, customer_id, promo_code, channel_id, run_id, source)
                    VALUES %s ON CONFLICT ON CONSTRAINT bench_raw_once DO NOTHING RETURNING id""",
                    page, page_size=max(1, len(page)), fetch=True)
                conn.commit()
                seconds += time.monotonic() - t0
                rows += len(page)
                inserted += len(got)
            cur.execute("DROP TABLE bench_raw_grants")
            conn.commit()
    finally:
        conn.close()
    return {"method": "execute_values", "rows": rows, "inserted": inserted, "seconds": round(seconds, 3),
            "rows_per_s": round(rows / seconds, 1) if seconds else None}


RAW_GRANTS_TABLE = """
    CREATE TABLE {t} (
        id bigserial PRIMARY KEY, campaign_id bigint NOT NULL, customer_id text NOT NULL,
        promo_code text NOT NULL, channel_id bigint, run_id bigint, source text NOT NULL,
        status text NOT NULL DEFAULT 'claimed', attempts integer NOT NULL DEFAULT 0,
        reference text, reason text, created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(), scope bigint NOT NULL DEFAULT 0,
        notification_id bigint, idempotency_key text NOT NULL, action_id bigint,
        CONSTRAINT {t}_once UNIQUE (campaign_id, customer_id, promo_code, scope))"""


def relay_grant_pages(spec: dict, page_size: int, source: str):
    """Per Optimove page, the relay's own grant claim columns: (fixed, varying) as `repo.claim` gets them
    from `Grants.columns` (idempotency keys and ActionIDs included)."""
    from shared.flows.grants import GRANTS
    from shared.flows.ledger import Scope

    for channel, claims in grant_pages(spec, page_size):
        scope = Scope(spec["campaign_id"], channel, source)
        yield scope.fixed(), GRANTS.columns(scope, claims)


# --- flow 4: conditional execution (--role conditional) ------------------------------------------

def run_conditional_campaign(relay: Relay, sim: dict, db_url: str, campaign_id: int, n: int, timeout: float,
                             clearance_in: float) -> dict:
    """Create a conditional campaign of `n` customers in the fake Optimove, post EventTypeID 5 with
    ClearanceRequiredBy `clearance_in` seconds ahead, wait until Postgres marks the run `done` (every customer's
    status reported), then check the fake bonus system, the fake Optimove's statuses and Postgres."""
    session = requests.Session()
    spec = conditional_campaign_spec(campaign_id, n)
    created = session.post(f"{sim['optimove_url']}/_sim/campaigns", json=spec, timeout=30)
    created.raise_for_status()
    created = created.json()
    expected, audience = created["expected_triples"], created["audience"]
    ledger_url = f"{sim['bonus_admin_url']}/_sim/ledger"
    status_url = f"{sim['optimove_url']}/_sim/promotion-status"
    before = session.get(ledger_url, timeout=30).json()
    listener = f"{relay.base}/optimove/events?token={TOKEN}"
    warm_target = max(1, int(RSS_WARM_FRACTION * expected))
    marks: dict[str, float] = {}

    def progress(totals, now):
        deciles.update(totals, now)
        if "warm" not in marks and totals["granted"] >= warm_target:
            marks["warm"] = now
        if "granted" not in marks and totals["granted"] >= expected:
            marks["granted"] = now

    def ended(totals):
        return totals["runs"] and "running" not in totals["runs_by_status"]

    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        with RssSampler(relay.workers) as rss, conn.cursor() as cur:
            cpu_before = relay.cpu.snapshot()
            started = time.monotonic()
            deciles = Deciles("granted", expected, started)
            fired_at = time.time()
            stamp, _ = optimove_time(fired_at)
            clearance, deadline = optimove_time(fired_at + clearance_in)
            r = session.post(listener, json={"EventTypeID": 5, "TimeStamp": stamp, "CampaignID": campaign_id,
                                             "ClearanceRequiredBy": clearance}, timeout=30)
            if r.status_code not in (200, 202):
                raise RuntimeError(f"listener answered {r.status_code}: {r.text[:300]}")
            finished = wait_for(cur, relay, campaign_id, ended, min(timeout, clearance_in + 30), "ended", progress)
            seconds = finished - started
            cpu = CpuMeter.spent(cpu_before, relay.cpu.snapshot())
        rss.sample()  # the end
        profile = rss_profile(rss.history, marks.get("warm", time.monotonic()))
        with conn.cursor() as cur:  # checks, outside the timing
            totals = run_totals(cur, campaign_id)
            cur.execute("SELECT status, count(*) FROM grants WHERE campaign_id = %s GROUP BY status", (campaign_id,))
            by_status = dict(cur.fetchall())
    finally:
        conn.close()
    status = session.get(status_url, params={"campaign_id": campaign_id, "customers": 0, "deadline": deadline},
                         timeout=60).json()
    after = session.get(ledger_url, timeout=30).json()
    peer = check_grants(session, ledger_url, spec)
    delta = {name: after[name] - before[name] for name in ("applied", "unique_triples", "duplicate_grants", "rejected")}
    statuses = {"reported": status["reported"], "true": status["true"], "false": status["false"],
                "true_then_false": status["true_then_false"], "calls": len(status["calls"]),
                "max_call_size": status["max_call_size"], "calls_after_deadline": status["calls_after_deadline"]}
    last_report = max((call["at"] for call in status["calls"]), default=None)
    ok = (delta == {"applied": expected, "unique_triples": expected, "duplicate_grants": 0, "rejected": 0}
          and peer["applied"] == expected and peer["missing"] == peer["duplicates"] == peer["rejected"] == 0
          and peer["unexpected"] == 0 and by_status == {"granted": expected}
          and totals["runs_by_status"] == {"done": 1} and totals["fetched"] == audience
          and totals["reported_true"] == audience and totals["reported_false"] == totals["expired"] == 0
          and statuses["reported"] == statuses["true"] == audience and statuses["false"] == 0
          and statuses["true_then_false"] == statuses["calls_after_deadline"] == 0
          and 0 < statuses["max_call_size"] <= MAX_PROMOS_UPDATED)
    return {
        "customers_per_channel": n, "channels": [], "rows_fetched": totals["fetched"],
        "expected_rows_fetched": audience, "unique_customers": audience, "ledger_rows": expected,
        "seconds": round(seconds, 3), "deciles_s": deciles.seconds, "cpu_s": cpu,
        "last_grant_s": round(marks["granted"] - started, 3) if "granted" in marks else None,
        "last_report_at_optimove_s": round(last_report - fired_at, 3) if last_report is not None else None,
        "clearance_required_by": clearance, "clearance_in_s": clearance_in,
        "rss": profile, "peer": peer, "peer_counters_delta": delta, "statuses": statuses,
        "postgres_by_status": by_status, "runs": totals, "ok": ok,
    }


# --- flow 1: pre-scheduled sends (--role send) ---------------------------------------------------

def send_channel_config(channels: tuple[int, ...]) -> dict:
    """The RELAY_CHANNEL_CONFIG the bench writes: the campaign's channels are send channels."""
    return {"default_role": "bonus",
            "channels": {str(c): {"role": "send", "attributes": list(SEND_ATTRIBUTES)} for c in channels}}


def send_env(args, env: dict, sim: dict, tmp: Path, channels: tuple[int, ...]) -> dict:
    """`relay_env` plus the channel config and the batch send adapter against the fake send service."""
    path = tmp / "channels.json"
    path.write_text(json.dumps(send_channel_config(channels)))
    return {**env, "RELAY_CHANNEL_CONFIG": str(path), "SEND_ADAPTER": "http", "SEND_URL": sim["send_url"],
            "SEND_MODE": "batch", "SEND_BATCH_SIZE": str(args.batch_size)}


def send_campaign_spec(campaign_id: int, channels: tuple[int, ...], n: int, start: float | None = None) -> dict:
    """A send campaign: no overlap, every ScheduledTime due at `start` (default now, to the second)."""
    return campaigns.validate_spec({
        "campaign_id": campaign_id, "channels": list(channels), "customers_per_channel": n, "overlap": 0.0,
        "templates": list(SEND_TEMPLATES), "timezone": "UTC", "attribute_form": SEND_ATTRIBUTE_FORM,
        "schedule": {"start": time.time() if start is None else start, "spread_seconds": 0,
                     "due_now_fraction": 1.0, "with_seconds": True}})


def check_peer(session: requests.Session, ledger_url: str, spec: dict) -> dict:
    """Every expected send of `spec` at the fake send service: each (channel, customer) applied exactly once,
    with the expected template, attributes and ScheduledTime, never early, nothing rejected or unexpected.

    Reads the campaign's ledger entries PEER_CHUNK customer numbers at a time (customer prefix C000, C001, …)
    so a million entries are never one response. Also returns the first and last receive times (epoch).
    """
    campaign_id, channels, n = spec["campaign_id"], spec["channels"], spec["customers_per_channel"]
    index = {channel: k for k, channel in enumerate(channels)}   # overlap 0: channel k holds k*n .. k*n+n-1
    seen = {channel: bytearray(n) for channel in channels}
    out = {"entries": 0, "applied_keys": 0, "duplicates": 0, "rejected": 0, "early": 0, "unexpected": 0,
           "wrong_template": 0, "wrong_time": 0, "wrong_attributes": 0, "examples": []}
    first = last = None
    dues: dict[str, float] = {}
    blocks = (len(channels) * n - 1) // PEER_CHUNK + 1 if n else 0
    for block in range(blocks):
        r = session.get(ledger_url, params={"full": 1, "campaign_id": campaign_id,
                                            "customer_prefix": f"C{block:03d}"}, timeout=600)
        r.raise_for_status()
        for entry in r.json()["entries"]:
            out["entries"] += 1
            _, channel, customer, template, notification = entry["key"]
            number = campaigns.customer_number(customer)
            k = index.get(channel)
            position = number - k * n if k is not None else -1
            if not 0 <= position < n or notification is not None:
                out["unexpected"] += 1
                continue
            applications = entry["applications"]
            seen[channel][position] = min(255, seen[channel][position] + applications)
            if entry["rejections"]:
                out["rejected"] += 1
            if applications:
                out["applied_keys"] += 1
            label = f"{channel}/{customer}"
            if template != campaigns.template_for(spec, number):
                out["wrong_template"] += 1
                out["examples"].append(f"{label}: template {template}")
            stamp = campaigns.scheduled_time(spec, number)
            if stamp not in dues:
                dues[stamp] = campaigns.due_time(spec, number).timestamp()
            due = dues[stamp]
            if entry.get("due_at") is None or abs(entry["due_at"] - due) > 0.001:
                out["wrong_time"] += 1
                out["examples"].append(f"{label}: due_at {entry.get('due_at')}, expected {due}")
            if entry.get("early") or entry["first_received_at"] < due:
                out["early"] += 1
            want = {name: campaigns.attribute_value(name, number) for name in SEND_ATTRIBUTES}
            if entry.get("detail") != want:
                out["wrong_attributes"] += 1
                out["examples"].append(f"{label}: attributes {entry.get('detail')}")
            first = entry["first_received_at"] if first is None else min(first, entry["first_received_at"])
            if entry.get("applied_at") is not None:
                last = entry["applied_at"] if last is None else max(last, entry["applied_at"])
    out["sent_once"] = sum(counts.count(1) for counts in seen.values())
    out["missing"] = sum(counts.count(0) for counts in seen.values())
    out["duplicates"] = sum(c - 1 for counts in seen.values() for c in counts if c > 1)
    out["examples"] = out["examples"][:5]
    out["first_received_at"], out["last_applied_at"] = first, last
    return out



def run_send_campaign(relay: Relay, sim: dict, db_url: str, campaign_id: int, n: int, timeout: float,
                      channels: tuple[int, ...]) -> dict:
    """Create the send campaign in the fake Optimove, fire one EventTypeID 13 per channel, wait until Postgres
    records the last send `sent`, then check the fake send service and Postgres send by send."""
    session = requests.Session()
    spec = send_campaign_spec(campaign_id, channels, n)
    created = session.post(f"{sim['optimove_url']}/_sim/campaigns", json=spec, timeout=30)
    created.raise_for_status()
    created = created.json()
    expected, unique = created["expected_sends"], created["unique_customers"]
    ledger_url = f"{sim['send_admin_url']}/_sim/ledger"
    before = session.get(ledger_url, timeout=30).json()
    listener = f"{relay.base}/optimove/events?token={TOKEN}"
    warm_target = max(1, int(RSS_WARM_FRACTION * expected))
    marks: dict[str, float] = {}

    def progress(totals, now):
        deciles.update(totals, now)
        if "warm" not in marks and totals["sent"] >= warm_target:
            marks["warm"] = now

    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        with RssSampler(relay.workers) as rss, conn.cursor() as cur:
            cpu_before = relay.cpu.snapshot()
            started = time.monotonic()
            deciles = Deciles("sent", expected, started)
            fired_at = time.time()
            fire(session, listener, campaign_id, channels)
            ended = wait_for(cur, relay, campaign_id, lambda t: t["sent"] >= expected, timeout, "sent", progress)
            seconds = ended - started
            cpu = CpuMeter.spent(cpu_before, relay.cpu.snapshot())
        rss.sample()  # the end
        profile = rss_profile(rss.history, marks.get("warm", time.monotonic()))
        with conn.cursor() as cur:  # checks, outside the timing
            totals = settled_runs(cur, campaign_id, len(channels))
            cur.execute("SELECT status, count(*) FROM sends WHERE campaign_id = %s GROUP BY status", (campaign_id,))
            by_status = dict(cur.fetchall())
    finally:
        conn.close()
    after = session.get(ledger_url, timeout=30).json()
    peer = check_peer(session, ledger_url, spec)
    delta = {name: after[name] - before[name] for name in ("applied", "duplicate_sends", "early", "rejected")}
    ok = (peer["sent_once"] == expected and peer["missing"] == 0 and peer["duplicates"] == 0
          and peer["early"] == 0 and peer["rejected"] == 0 and peer["unexpected"] == 0
          and peer["wrong_template"] == peer["wrong_time"] == peer["wrong_attributes"] == 0
          and delta == {"applied": expected, "duplicate_sends": 0, "early": 0, "rejected": 0}
          and by_status == {"sent": expected} and totals["runs_by_status"] == {"done": len(channels)}
          and totals["fetched"] == expected)
    first, last = peer.pop("first_received_at"), peer.pop("last_applied_at")
    return {
        "customers_per_channel": n, "channels": list(channels), "rows_fetched": totals["fetched"],
        "expected_rows_fetched": expected, "unique_customers": unique, "ledger_rows": expected,
        "seconds": round(seconds, 3), "deciles_s": deciles.seconds, "cpu_s": cpu,
        "first_send_at_peer_s": round(first - fired_at, 3) if first is not None else None,
        "last_send_at_peer_s": round(last - fired_at, 3) if last is not None else None,
        "rss": profile, "peer": peer, "peer_counters_delta": delta, "postgres_by_status": by_status,
        "runs": totals, "ok": ok,
    }


RAW_SENDS_TABLE = """
    CREATE TABLE {t} (
        id bigserial PRIMARY KEY, campaign_id bigint NOT NULL, channel_id bigint NOT NULL,
        customer_id text NOT NULL, template_id bigint NOT NULL, scope bigint NOT NULL DEFAULT 0,
        notification_id bigint, run_id bigint, source text NOT NULL,
        attributes jsonb NOT NULL DEFAULT '{{}}', promo_codes jsonb NOT NULL DEFAULT '[]',
        scheduled_time timestamptz, idempotency_key text NOT NULL,
        status text NOT NULL DEFAULT 'claimed', attempts integer NOT NULL DEFAULT 0,
        reference text, reason text, created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT {t}_once UNIQUE (campaign_id, channel_id, customer_id, template_id, scope))"""


def send_pages(spec: dict, page_size: int):
    """Per Optimove page, in channel order, the relay's own claim columns: (fixed, varying) as `repo.claim`
    gets them from `Sends.columns` (rows parsed by flow 1's `sends_of_page`, idempotency keys included)."""
    from types import SimpleNamespace

    from shared.flows.ledger import Scope
    from shared.flows.scheduled_send import sends_of_page
    from shared.flows.sends import SENDS
    from shared.settings import ChannelConfig

    channels = spec["channels"]
    settings = SimpleNamespace(optimove_timezone="UTC", channels=ChannelConfig(
        roles={c: "send" for c in channels}, attributes={c: SEND_ATTRIBUTES for c in channels}))
    n = spec["customers_per_channel"]
    for channel in channels:
        run = {"id": None, "campaign_id": spec["campaign_id"], "channel_id": channel}
        for skip in range(0, n, page_size):
            rows = campaigns.send_rows(spec, channel, skip, page_size, SEND_ATTRIBUTES)
            scope = Scope(spec["campaign_id"], channel, SEND_SOURCE)
            yield scope.fixed(), SENDS.columns(scope, sends_of_page(rows, run, settings))


# --- raw inserts of the relay's own columns --------------------------------------------------------

def raw_ledger_insert_rate(db_url: str, pages, ddl: str, table: str, method: str) -> dict:
    """Rows/s of inserting the relay's own claim columns (`pages` of (fixed, varying), as `repo.claim` gets
    them) into a fresh ledger-shaped table `table` (`ddl`), one page per statement and commit: `method`
    "execute_values" or "relay_columns" (`INSERT … VALUES … ON CONFLICT DO NOTHING RETURNING id`) or "unnest"
    (the relay's `INSERT … SELECT FROM unnest(arrays) … ON CONFLICT DO NOTHING RETURNING`, sends only).
    Only the statements and commits are timed; each page's rows are built before its statement."""
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
            cur.execute(ddl.format(t=table))
            conn.commit()
            rows = inserted = 0
            seconds = 0.0
            for fixed, varying in pages:
                size = len(next(iter(varying.values()))[1])
                names = [*fixed, *varying, "status"]
                if method != "unnest":
                    columns = [[v] * size for v in fixed.values()] + [vals for _, vals in varying.values()]
                    page = list(zip(*columns, ["claimed"] * size))
                    t0 = time.monotonic()
                    got = execute_values(cur, f"""
                        INSERT INTO {table} ({", ".join(names)}) VALUES %s
                        ON CONFLICT ON CONSTRAINT {table}_once DO NOTHING RETURNING id""",
                        page, page_size=max(1, size), fetch=True)
                else:
                    select = ", ".join(["%s"] * len(fixed) + [f"u.{name}" for name in varying])
                    arrays = ", ".join(f"%s::{pg_type}[]" for pg_type, _ in varying.values())
                    params = (*fixed.values(), *(list(values) for _, values in varying.values()))
                    t0 = time.monotonic()
                    cur.execute(f"""
                        INSERT INTO {table} ({", ".join(names)})
                        SELECT {select}, CASE WHEN u.scheduled_time > now() THEN 'waiting' ELSE 'claimed' END
                        FROM unnest({arrays}) AS u({", ".join(varying)})
                        ON CONFLICT ON CONSTRAINT {table}_once DO NOTHING RETURNING id, status""", params)
                    got = cur.fetchall()
                conn.commit()
                seconds += time.monotonic() - t0
                rows += size
                inserted += len(got)
            cur.execute(f"DROP TABLE {table}")
            conn.commit()
    finally:
        conn.close()
    return {"method": method, "rows": rows, "inserted": inserted, "seconds": round(seconds, 3),
            "rows_per_s": round(rows / seconds, 1) if seconds else None}


# --- the benchmark ------------------------------------------------------------------------------

def channel_ids(role: str, count: int) -> tuple[int, ...]:
    """The campaign's channels: 504, 505, 506 … (bonus), 610, 611, 612 … (send), none (conditional)."""
    if role == "conditional":
        return ()
    first = (CHANNELS if role == "bonus" else SEND_CHANNELS)[0]
    return tuple(first + i for i in range(count))


def campaign_sizes(args) -> list[int]:
    """Customers per channel, one campaign each: `--sizes`, else `--customers`, else the role's default."""
    if args.sizes:
        return [int(s) for s in args.sizes.split(",")]
    if args.customers is not None:
        return [args.customers]
    if args.sizes is None and args.role == "bonus":
        return list(BONUS_SIZES)
    return [{"bonus": BONUS_CUSTOMERS, "send": SEND_CUSTOMERS, "conditional": CONDITIONAL_CUSTOMERS}[args.role]]


def run_role(args, relay: Relay, sim: dict, db_url: str, campaign_id: int, n: int, timeout: float,
             channels: tuple[int, ...]) -> dict:
    """One campaign of the role, measured and checked."""
    if args.role == "send":
        return run_send_campaign(relay, sim, db_url, campaign_id, n, timeout, channels)
    if args.role == "conditional":
        return run_conditional_campaign(relay, sim, db_url, campaign_id, n, timeout, args.clearance_in)
    return run_bonus_campaign(relay, sim, db_url, campaign_id, n, timeout, channels)


def measure_raw(role: str, db_url: str, campaign_id: int, n: int, page_size: int, channels: tuple[int, ...]) -> dict:
    """The raw inserts of the campaign's rows: the yardstick ("execute_values") and the role's reference."""
    if role == "send":
        spec = send_campaign_spec(campaign_id, channels, n)
        return {method: raw_ledger_insert_rate(db_url, send_pages(spec, page_size), RAW_SENDS_TABLE,
                                               f"bench_raw_sends_{method}", method)
                for method in RAW_METHODS[role]}
    if role == "conditional":
        spec, source = conditional_campaign_spec(campaign_id, n), CONDITIONAL_SOURCE
    else:
        spec, source = bonus_campaign_spec(campaign_id, channels, n), "scheduled_bonus"
    return {"execute_values": raw_grant_insert_rate(db_url, spec, page_size, source),
            "relay_columns": raw_ledger_insert_rate(db_url, relay_grant_pages(spec, page_size, source),
                                                    RAW_GRANTS_TABLE, "bench_raw_grants_relay", "relay_columns")}


def derive(r: dict, role: str) -> None:
    """Rates, per-row costs and ratios of one size from its seconds, counts and raw inserts."""
    seconds, fetched = r["seconds"], max(1, r["rows_fetched"])
    yardstick, reference = r["raw"]["execute_values"], r["raw"][RAW_METHODS[role][1]]
    r["fetched_per_s"] = round(fetched / seconds, 1)
    r["customers_per_s"] = round(r["unique_customers"] / seconds, 1)
    r["ledger_rows_per_s"] = round(r["ledger_rows"] / seconds, 1)
    r["us_per_fetched_row"] = round(1e6 * seconds / fetched, 2)
    r["us_per_customer"] = round(1e6 * seconds / max(1, r["unique_customers"]), 2)
    r["raw_rows_per_s"] = yardstick["rows_per_s"]
    r["raw_fetched_per_s"] = round(fetched / yardstick["seconds"], 1)   # the raw rate of the same rows, per fetched row
    r["fetch_ratio"] = round(r["fetched_per_s"] / r["raw_fetched_per_s"], 3)   # = raw seconds / end-to-end seconds
    r["customer_ratio"] = round(r["customers_per_s"] / yardstick["rows_per_s"], 3)   # the former ratio
    r["reference_fetch_ratio"] = round(reference["seconds"] / seconds, 3)


def run(args) -> dict:
    role = args.role
    sizes, channels = campaign_sizes(args), channel_ids(role, args.channels)
    tmp = Path(tempfile.mkdtemp(prefix="relay-campaign-bench-"))
    results = []
    with ExitStack() as stack:
        if not args.keep_logs:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        embedded = [name for name, var in (("postgres", "DATABASE_URL"), ("redis", "REDIS_URL"))
                    if not os.environ.get(var)]
        db_url, redis_url, store_pids, notes = start_stores(tmp, stack, appendonly=True)
        sim = start_simulator(tmp, stack, args.sim_rate_limit or args.rate_limit)
        env = relay_env(args, db_url, redis_url, sim, tmp)
        if role == "send":
            env = send_env(args, env, sim, tmp, channels)
        relay = launch_relay(args, env, tmp, stack, beat=role == "conditional")
        relay.cpu.add("simulator", [sim["pid"]])
        for name, pid in zip(embedded, store_pids):
            relay.cpu.add(name, [pid])
        campaign_id = int(time.time()) % 10 ** 6 * 10
        warm = run_role(args, relay, sim, db_url, campaign_id, WARMUP_CUSTOMERS, 120, channels)
        if not warm["ok"]:
            raise RuntimeError(f"warm-up campaign wrong: {warm}")
        for i, n in enumerate(sizes, start=1):
            checkpoint(db_url)
            raw = measure_raw(role, db_url, campaign_id + i, n, args.page_size, channels)
            checkpoint(db_url)
            try:
                result = run_role(args, relay, sim, db_url, campaign_id + i, n, args.timeout, channels)
            except Exception:
                print(relay.tails(), file=sys.stderr)
                raise
            result["raw"] = raw
            derive(result, role)
            results.append(result)
            print(f"[{role} {n}/channel] {result['seconds']:.2f}s, {result['fetched_per_s']:.0f} fetched rows/s, "
                  f"raw {raw['execute_values']['seconds']:.2f}s, fetch ratio {result['fetch_ratio']:.3f}, "
                  f"RSS tree max {result['rss']['tree_max_mb']:.1f} MB, {'exact' if result['ok'] else 'WRONG'}",
                  file=sys.stderr, flush=True)
        if args.keep_logs:
            print(f"logs in {tmp}", file=sys.stderr)
    smallest = min(results, key=lambda r: r["customers_per_channel"])
    largest = max(results, key=lambda r: r["customers_per_channel"])
    growth = round(largest["us_per_fetched_row"] / smallest["us_per_fetched_row"], 3)
    targets = {
        f"fetched rows/s >= {TARGET_FETCH_RATIO} x raw insert rate of the same rows at every size":
            all(r["fetch_ratio"] >= TARGET_FETCH_RATIO for r in results),
        f"worker tree RSS < {TARGET_RSS_MB} MB at every size":
            all(r["rss"]["tree_max_mb"] < TARGET_RSS_MB for r in results),
        f"worker RSS flat (max <= RSS at {RSS_WARM_FRACTION:.0%} + {TARGET_RSS_FLAT_MB} MB) at every size":
            all(r["rss"]["growth_after_warm_mb"] <= TARGET_RSS_FLAT_MB for r in results),
    }
    if len(results) > 1:
        targets[f"per-row cost growth <= {TARGET_GROWTH}x (us per fetched row, largest / smallest size)"] = \
            growth <= TARGET_GROWTH
    targets["exact counts"] = all(r["ok"] for r in results)
    exe = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    setup = {"cpus": os.cpu_count(), "stores": ", ".join(notes), "worker_processes": args.worker_processes,
             "worker_concurrency": args.workers, "page_size": args.page_size, "batch_size": args.batch_size,
             "rate_limit": args.rate_limit, "channels": list(channels), "codes": list(CODES),
             "multi_code_every": MULTI_CODE_EVERY, "rss_interval_s": RSS_INTERVAL, "poll_interval_s": POLL_INTERVAL,
             "release_interval_s": args.release_interval}
    if role == "bonus":
        setup.update(overlap=OVERLAP)
    elif role == "send":
        setup.update(channel_config=send_channel_config(channels), templates=list(SEND_TEMPLATES),
                     attributes=list(SEND_ATTRIBUTES), attribute_form=SEND_ATTRIBUTE_FORM, due_now_fraction=1.0,
                     overlap=0.0)
    else:
        setup.update(clearance_in_s=args.clearance_in)
    return {"role": role, "sizes": results, "growth_per_fetched_row": growth,
            "growth_sizes": [smallest["customers_per_channel"], largest["customers_per_channel"]],
            "targets": targets, "setup": setup,
            "command": " ".join(shlex.quote(a) for a in [exe, *sys.argv])}


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


LEDGER_NOUN = {"bonus": "grants", "send": "sends", "conditional": "grants"}


def report(res: dict) -> str:
    role, s = res["role"], res["setup"]
    noun = LEDGER_NOUN[role]
    channels = s["channels"]
    batch = "send" if role == "send" else "bonus"
    lines = [f"command: {res['command']}",
             f"setup:   {s['cpus']} CPUs, {s['stores']}, {s['worker_processes']} worker process(es) x prefork "
             f"{s['worker_concurrency']}, page {s['page_size']}, {batch} batch {s['batch_size']} (batch adapter), "
             f"rate limit {s['rate_limit']}"]
    codes = f"{'+'.join(s['codes'])} for every {s['multi_code_every']}nd customer, {s['codes'][0]} otherwise"
    if role == "bonus":
        overlap = f"{s['overlap']:.0%} overlap" if len(channels) > 1 else "no overlap (one channel)"
        lines.append(f"         flow 3 (scheduled grants): {len(channels)} channel(s) {', '.join(map(str, channels))}, "
                     f"{overlap}, codes {codes}")
    elif role == "send":
        lines.append(f"         flow 1 (pre-scheduled sends): {len(channels)} send channel(s) "
                     f"{', '.join(map(str, channels))}, no overlap, attributes {','.join(s['attributes'])} "
                     f"({s['attribute_form']} list/string form), templates {','.join(map(str, s['templates']))}, "
                     f"every send due now")
    else:
        lines.append(f"         flow 4 (conditional, EventTypeID 5, no channel): ClearanceRequiredBy "
                     f"{s['clearance_in_s']:g} s ahead, codes {codes}; beat runs (RELAY_RELEASE_INTERVAL "
                     f"{'default' if s['release_interval_s'] is None else s['release_interval_s']})")
    lines += ["", f"{'N/chan':>8}{'fetched':>9}{'unique':>9}{noun:>9}{'secs':>8}{'fetched/s':>10}{'cust/s':>8}"
                  f"{noun + '/s':>9}{'us/row':>8}{'raw rows/s':>11}{'raw fetch/s':>12}{'FETCH RATIO':>12}"
                  f"{'cust ratio':>11}{'RSS tree max':>13}  exact"]
    for r in res["sizes"]:
        lines.append(f"{r['customers_per_channel']:>8}{r['rows_fetched']:>9}{r['unique_customers']:>9}"
                     f"{r['ledger_rows']:>9}{r['seconds']:>8.2f}{r['fetched_per_s']:>10.0f}{r['customers_per_s']:>8.0f}"
                     f"{r['ledger_rows_per_s']:>9.0f}{r['us_per_fetched_row']:>8.1f}{r['raw_rows_per_s']:>11.0f}"
                     f"{r['raw_fetched_per_s']:>12.0f}{r['fetch_ratio']:>12.3f}{r['customer_ratio']:>11.3f}"
                     f"{r['rss']['tree_max_mb']:>10.1f} MB  {'yes' if r['ok'] else 'WRONG COUNTS'}")
    lines.append("")
    for r in res["sizes"]:
        n, peer = r["customers_per_channel"], r["peer"]
        if role == "send":
            lines.append(f"{n:>8}: send service: once {peer['sent_once']}, dup {peer['duplicates']}, early "
                         f"{peer['early']}, rejected {peer['rejected']}, missing {peer['missing']}, unexpected "
                         f"{peer['unexpected']}; Postgres sent {r['postgres_by_status'].get('sent', 0)}; runs "
                         f"{r['runs']['runs_by_status']}; 1st/last send at the peer "
                         f"{_secs(r['first_send_at_peer_s'])} / {_secs(r['last_send_at_peer_s'])}")
        else:
            lines.append(f"{n:>8}: bonus system: applied {peer['applied']}, dup {peer['duplicates']}, rejected "
                         f"{peer['rejected']}, missing {peer['missing']}, unexpected {peer['unexpected']} "
                         f"(counters {r['peer_counters_delta']}); Postgres {r['postgres_by_status']}; runs "
                         f"{r['runs']['runs_by_status']}")
        if role == "conditional":
            st = r["statuses"]
            lines.append(f"{'':>10}statuses at Optimove: reported {st['reported']}, true {st['true']}, false "
                         f"{st['false']}, true->false {st['true_then_false']}, {st['calls']} calls (largest "
                         f"{st['max_call_size']}), {st['calls_after_deadline']} after the deadline; run counted true "
                         f"{r['runs']['reported_true']}, false {r['runs']['reported_false']}, expired "
                         f"{r['runs']['expired']}; last grant recorded at {_secs(r['last_grant_s'])}, last report "
                         f"received at {_secs(r['last_report_at_optimove_s'])}, run done at {r['seconds']:.2f}s")
        cpu = r["cpu_s"]
        lines.append(f"{'':>10}CPU seconds during it: " + ", ".join(f"{name} {sec:.1f}" for name, sec in cpu.items())
                     + f" (total {sum(cpu.values()):.1f} of {s['cpus'] * r['seconds']:.1f} on {s['cpus']} CPUs); "
                     f"10 %, 20 %, ... 100 % of the {noun} recorded at " + " ".join(f"{t:g}" for t in r["deciles_s"])
                     + " s")
        if cpu.get("other", 0.0) > OTHER_CPU_WARN * r["seconds"]:
            lines.append(f"{'':>10}WARNING: other processes used {cpu['other']:.1f} CPU seconds during it (more than "
                         f"{OTHER_CPU_WARN:g} of a core): the figures of this size are disturbed")
        if not r["ok"] and peer.get("examples"):
            lines.append(f"{'':>10}examples: {peer['examples']}")
    lines += ["", f"worker RSS, whole tree (largest pool child), sampled every {s['rss_interval_s']:g} s:"]
    for r in res["sizes"]:
        m = r["rss"]
        lines.append(f"{r['customers_per_channel']:>8}: start {m['tree_start_mb']:.1f} ({m['child_start_mb']:.1f})"
                     f", at {RSS_WARM_FRACTION:.0%} {m['tree_warm_mb']:.1f} ({m['child_warm_mb']:.1f})"
                     f", max {m['tree_max_mb']:.1f} ({m['child_max_mb']:.1f})"
                     f", end {m['tree_end_mb']:.1f} ({m['child_end_mb']:.1f}) MB"
                     f"; max - at {RSS_WARM_FRACTION:.0%} = {m['growth_after_warm_mb']:+.1f} MB, "
                     f"{m['samples']} samples")
    lines.append("")
    if role == "conditional":
        lines.append("secs = EventTypeID 5 posted -> Postgres marks the run `done` (every status reported; polled "
                     f"every {s['poll_interval_s'] * 1000:g} ms)")
    else:
        last = "grant `granted`" if role == "bonus" else "send `sent`"
        lines.append(f"secs = first notification posted -> Postgres records the last {last} (runs' counters, polled "
                     f"every {s['poll_interval_s'] * 1000:g} ms)")
    lines.append("fetched = rows the relay paged from Optimove (runs' `fetched`); us/row = microseconds per "
                 "fetched row")
    rows = " / ".join(str(r["raw"]["execute_values"]["rows"]) for r in res["sizes"])
    if role == "send":
        lines.append(f"raw = execute_values INSERT ... ON CONFLICT DO NOTHING RETURNING id of the same rows ({rows}: "
                     "the relay's own parsed pages, keys and columns, built outside the timing), one page per "
                     "statement and commit, fresh sends-shaped table (same columns, defaults and unique constraint, "
                     "no secondary indexes), same server")
    else:
        lines.append("raw = execute_values INSERT ... ON CONFLICT DO NOTHING RETURNING id of the same (customer, "
                     f"code) rows ({rows}), one page per statement and commit, fresh narrow grants table with the same "
                     "unique constraint, same server")
    lines.append("raw fetch/s = fetched rows / seconds of the raw insert of all their rows; FETCH RATIO = fetched/s / "
                 f"raw fetch/s = raw seconds / end-to-end seconds (issue 10 target >= {TARGET_FETCH_RATIO})")
    lines.append("cust ratio = unique customers/s / raw rows/s: the bench's former ratio (its former "
                 f"{FORMER_CUSTOMER_RATIO} target was the bench's own, not the issue's)")
    ref = RAW_METHODS[role][1]
    label = ("the relay's own INSERT ... SELECT FROM unnest ... ON CONFLICT shape" if ref == "unnest" else
             "the relay-shaped grant row: idempotency key, scope, ActionID; execute_values")
    lines.append(f"reference raw ({label}): " + ", ".join(
        f"{r['raw'][ref]['rows_per_s']:.0f} rows/s (fetch ratio {r['reference_fetch_ratio']:.3f})"
        for r in res["sizes"]))
    if len(res["sizes"]) > 1:
        small, large = res["growth_sizes"]
        lines.append(f"per-row cost growth, {large} vs {small} per channel: {res['growth_per_fetched_row']:.3f}x "
                     "(us per fetched row)")
    for name, met in res["targets"].items():
        lines.append(f"target {name}: {'met' if met else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=ROLES, default="bonus",
                        help="bonus: flow 3 grants (504..); send: flow 1 pre-scheduled sends (610..); conditional: "
                        "flow 4 (EventTypeID 5, no channel)")
    parser.add_argument("--customers", type=int, default=None,
                        help="customers per channel, one campaign (without --sizes; default 300000 for bonus "
                        "with --sizes '', 100000 for send and conditional)")
    parser.add_argument("--sizes", default=None, help="comma-separated customers per channel, one campaign each "
                        "(default 100000,300000 for bonus unless --customers is given; --customers otherwise)")
    parser.add_argument("--channels", type=int, default=3, choices=range(1, 11), metavar="1..10",
                        help="channels of the campaign (504.. for bonus, 610.. for send; conditional has none)")
    parser.add_argument("--workers", type=int, default=2, help="prefork concurrency of each worker process")
    parser.add_argument("--worker-processes", type=int, default=1, help="`relay worker` processes")
    parser.add_argument("--page-size", type=int, default=10_000, help="OPTIMOVE_PAGE_SIZE")
    parser.add_argument("--batch-size", type=int, default=5000, help="BONUS_BATCH_SIZE (SEND_BATCH_SIZE with "
                        "--role send)")
    parser.add_argument("--rate-limit", default="100000/1s", help="OPTIMOVE_RATE_LIMIT (and the simulator's)")
    parser.add_argument("--sim-rate-limit", default=None, help="the simulator's --rate-limit if different")
    parser.add_argument("--clearance-in", type=float, default=CLEARANCE_IN,
                        help="--role conditional: seconds from EventTypeID 5 to ClearanceRequiredBy")
    parser.add_argument("--release-interval", type=float, default=None,
                        help="RELAY_RELEASE_INTERVAL (beat's tick, which reports a conditional run's last statuses; "
                        "default: the relay's)")
    parser.add_argument("--log-level", default="info", help="RELAY_LOG_LEVEL of the relay processes")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a campaign counts as stuck")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp folder with the process logs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)

    def terminate(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, terminate)

    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0 if result["targets"]["exact counts"] else 1


if __name__ == "__main__":
    sys.exit(main())
