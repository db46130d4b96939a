"""Scheduled campaign throughput (flow 3 grants, flow 1 sends), end to end, against the raw insert limit, in one run.

    .venv/bin/python bench/campaign.py [--role bonus|send] [--customers N] [--sizes 100000,300000]
                                       [--channels 3] [--workers 2] [--json]

Starts Postgres and Redis (embedded under a temp folder unless DATABASE_URL/REDIS_URL are set), the
simulator (`python -m simulator serve`, fake Optimove + fake bonus system) and the relay's `web` and
`worker` processes, each in its own session with its log in a file. For every size N in `--sizes`
it creates a 3-channel campaign of N customers per channel with 50 % overlap (consecutive channels
share half their customers, so 2N unique customers) in which every 2nd customer holds two promo
codes (WB23 and NV10): 3N (customer, promo) triples to grant, 4.5N rows offered to the ledger.
It fires the three EventTypeID 13 notifications and measures from the first notification until
Postgres records the last grant as `granted`, then checks the fake bonus system's ledger
(applied == expected triples, no duplicate grants). The worker process tree's RSS is sampled with
psutil every 0.2 s.

The raw limit is the same rows (all three channels, in channel order, one Optimove page per
statement) inserted with `execute_values … ON CONFLICT DO NOTHING RETURNING id` into a fresh table
with the same unique constraint, on the same server, in one connection, one commit per page.

Targets: end-to-end customers/s ÷ raw rows/s >= 0.2; worker peak RSS < 300 MB and flat across
sizes; seconds per customer at the largest size <= 1.3x the smallest. Exits 0 whether or not
targets are met (1 when a campaign's counts are wrong).

`--role send` (flow 1, pre-scheduled sends) instead runs a send campaign on send channels 610, 611,
612 (role `send`, attributes Email and Country, in the channel config the bench writes), N
customers per channel (default 100,000; `--sizes` for several), no overlap, templates 14/15/16,
every ScheduledTime due now (due_now_fraction 1.0), attributes half in list and half in string
form. The relay pages GetCustomerSendDetailsByChannel, claims one `sends` row per (campaign,
channel, customer, template) and delivers them with the batch send adapter (SEND_BATCH_SIZE =
`--batch-size`) to the simulator's fake send service. Time runs from the first notification until
Postgres records the last send `sent` (the runs' `sent` counters, polled every 20 ms); the fake
send service's own receive times of the first and last send are reported too. The raw limit is
the same rows (the relay's own page parsing, keys and columns, computed outside the timing) inserted
with `execute_values … ON CONFLICT DO NOTHING RETURNING id` into a fresh sends-shaped table (same
columns, types and defaults, same unique constraint, no secondary indexes), one page per
statement and commit, as for grants; the relay's own `INSERT … SELECT FROM unnest … ON CONFLICT`
shape is measured next to it for reference. The worker tree's RSS is kept for every 0.2 s sample:
start (idle, after the warm-up), at 10 % of the sends recorded (the first pages done), max and end;
"flat" means max <= the 10 % value + 20 MB. Exactness: every expected (channel, customer,
template) applied exactly once at the fake send service with the expected attributes and
ScheduledTime, none early, none rejected, nothing else; Postgres holds exactly the expected rows,
all `sent`, and every run is `done`.
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

from bench._common import start_stores, stop_group  # noqa: E402
from cli.embedded import free_port, wait_for_port  # noqa: E402
from simulator import campaigns  # noqa: E402

TOKEN = "bench-listener-token-0123456789abcdef"
ADMIN_PASSWORD = "bench-admin-password"
API_KEY = "bench-sim-api-key-0123456789"
CHANNELS = (504, 505, 506)
CODES = ("WB23", "NV10")
MULTI_CODE_EVERY = 2
OVERLAP = 0.5
TARGET_RATIO = 0.2
TARGET_RSS_MB = 300
TARGET_GROWTH = 1.3
RSS_INTERVAL = 0.2
POLL_INTERVAL = 0.02
BONUS_SIZES = (100_000, 300_000)
BONUS_CUSTOMERS = 300_000       # with --sizes ''
# --role send (flow 1)
SEND_CHANNELS = (610, 611, 612)
SEND_TEMPLATES = (14, 15, 16)
SEND_ATTRIBUTES = ("Email", "Country")
SEND_ATTRIBUTE_FORM = "mixed"    # odd customers' attributes as one ';'-joined string, even ones as a list
SEND_CUSTOMERS = 100_000
SEND_SOURCE = "scheduled"
WARMUP_CUSTOMERS = 2000
TARGET_RSS_FLAT_MB = 20          # max tree RSS <= its value once RSS_WARM_FRACTION of the sends are recorded + this
RSS_WARM_FRACTION = 0.1
PEER_CHUNK = 100_000             # customer numbers per read of the fake send service's entries (prefix C000..)


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
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

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
    return json.loads(ready.read_text())


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
    (tmp / "metrics").mkdir(exist_ok=True)
    return env


def start_relay(args, env: dict, tmp: Path, stack: ExitStack) -> tuple[str, list[Group]]:
    """`relay web` (ready once /readyz answers) and `--worker-processes` × `relay worker`."""
    port = free_port()
    web = Group("web", [sys.executable, "-m", "cli.main", "web", "--port", str(port), "--workers", "2",
                        "--threads", "4"], env, tmp)
    stack.callback(web.stop)
    workers = []
    for i in range(args.worker_processes):
        w = Group(f"worker{i}", [sys.executable, "-m", "cli.main", "worker", "--concurrency", str(args.workers)],
                  env, tmp)
        stack.callback(w.stop)
        workers.append(w)
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
    return base, workers


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


def granted_so_far(cur, campaign_id: int) -> int:
    """Grants recorded `granted` for the campaign, from the runs' counters (updated in the settle transaction)."""
    cur.execute("SELECT coalesce(sum(granted), 0) FROM campaign_runs WHERE campaign_id = %s", (campaign_id,))
    return int(cur.fetchone()[0])


def run_campaign(base: str, sim: dict, db_url: str, workers: list[Group], campaign_id: int, n: int,
                 timeout: float, channels: tuple[int, ...] = CHANNELS) -> dict:
    """Create the campaign in the fake Optimove, fire the notifications (one per channel), wait for the last
    grant, check."""
    session = requests.Session()
    spec = {"campaign_id": campaign_id, "channels": list(channels), "customers_per_channel": n,
            "overlap": OVERLAP, "codes": list(CODES), "multi_code_every": MULTI_CODE_EVERY}
    created = session.post(f"{sim['optimove_url']}/_sim/campaigns", json=spec, timeout=30)
    created.raise_for_status()
    created = created.json()
    expected, unique = created["expected_triples"], created["unique_customers"]
    ledger_url = f"{sim['bonus_admin_url']}/_sim/ledger"
    before = session.get(ledger_url, timeout=30).json()
    listener = f"{base}/optimove/events?token={TOKEN}"
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        with RssSampler(workers) as rss, conn.cursor() as cur:
            started = time.monotonic()
            fire(session, listener, campaign_id, channels)
            deadline = started + timeout
            while (done := granted_so_far(cur, campaign_id)) < expected:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"campaign {campaign_id}: {done}/{expected} granted after {timeout:.0f}s")
                for w in workers:
                    w.check()
                time.sleep(POLL_INTERVAL)
            seconds = time.monotonic() - started
            cur.execute("SELECT status, count(*) FROM grants WHERE campaign_id = %s GROUP BY status", (campaign_id,))
            by_status = dict(cur.fetchall())
    finally:
        conn.close()
    after = session.get(ledger_url, timeout=30).json()
    applied = after["applied"] - before["applied"]
    duplicates = after["duplicate_grants"] - before["duplicate_grants"]
    ok = applied == expected and duplicates == 0 and by_status == {"granted": expected}
    return {
        "customers_per_channel": n, "unique_customers": unique, "expected_triples": expected,
        "seconds": round(seconds, 3),
        "customers_per_s": round(unique / seconds, 1), "grants_per_s": round(expected / seconds, 1),
        "us_per_customer": round(1e6 * seconds / unique, 2),
        "worker_rss_child_peak_mb": round(rss.child_peak / 2 ** 20, 1),
        "worker_rss_tree_peak_mb": round(rss.tree_peak / 2 ** 20, 1), "rss_samples": rss.samples,
        "bonus_applied": applied, "bonus_duplicate_grants": duplicates, "ledger_by_status": by_status, "ok": ok,
    }


def fire(session, listener: str, campaign_id: int, channels) -> None:
    """Post the campaign's EventTypeID 13 for each channel, as Optimove would."""
    for channel in channels:
        r = session.post(listener, json={"EventTypeID": 13, "TimeStamp": "2026-11-27 10:00:00",
                                         "CampaignID": campaign_id, "ChannelID": channel}, timeout=30)
        if r.status_code not in (200, 202):
            raise RuntimeError(f"listener answered {r.status_code}: {r.text[:300]}")


def channel_pages(spec: dict, page_size: int):
    """Per Optimove page, in channel order, the (customer, promo) pairs the relay offers to the ledger."""
    from shared.flows.grants import codes_per_customer

    n = spec["customers_per_channel"]
    for channel in spec["channels"]:
        for skip in range(0, n, page_size):
            yield codes_per_customer(campaigns.channel_rows(spec, channel, skip, page_size))


def raw_insert_rate(db_url: str, n: int, page_size: int, campaign_id: int,
                    channels: tuple[int, ...] = CHANNELS) -> dict:
    """Rows/s of `execute_values … ON CONFLICT DO NOTHING RETURNING id`, one page per statement, fresh table."""
    spec = {"campaign_id": campaign_id, "channels": list(channels), "customers_per_channel": n,
            "overlap": OVERLAP, "codes": list(CODES), "multi_code_every": MULTI_CODE_EVERY}
    pages = [[(campaign_id, customer, promo, channel, None, "scheduled_bonus") for customer, promo, *_ in pairs]
             for channel, pairs in zip(
                 [c for c in channels for _ in range(0, n, page_size)], channel_pages(spec, page_size))]
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
            started = time.monotonic()
            for page in pages:
                got = execute_values(cur, """
                    INSERT INTO bench_raw_grants (campaign_id, customer_id, promo_code, channel_id, run_id, source)
                    VALUES %s ON CONFLICT ON CONSTRAINT bench_raw_once DO NOTHING RETURNING id""",
                    page, page_size=max(1, len(page)), fetch=True)
                conn.commit()
                rows += len(page)
                inserted += len(got)
            seconds = time.monotonic() - started
            cur.execute("DROP TABLE bench_raw_grants")
            conn.commit()
    finally:
        conn.close()
    return {"rows": rows, "inserted": inserted, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1)}


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


def sent_so_far(cur, campaign_id: int) -> int:
    """Sends recorded `sent` for the campaign, from the runs' counters (updated in the settle transaction)."""
    cur.execute("SELECT coalesce(sum(sent), 0) FROM campaign_runs WHERE campaign_id = %s", (campaign_id,))
    return int(cur.fetchone()[0])


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


def run_send_campaign(base: str, sim: dict, db_url: str, workers: list[Group], campaign_id: int, n: int,
                      timeout: float, channels: tuple[int, ...]) -> dict:
    """Create the send campaign in the fake Optimove, fire one EventTypeID 13 per channel, wait until Postgres
    records the last send `sent`, then check the fake send service and Postgres send by send."""
    session = requests.Session()
    spec = send_campaign_spec(campaign_id, channels, n)
    created = session.post(f"{sim['optimove_url']}/_sim/campaigns", json=spec, timeout=30)
    created.raise_for_status()
    expected = created.json()["expected_sends"]
    ledger_url = f"{sim['send_admin_url']}/_sim/ledger"
    before = session.get(ledger_url, timeout=30).json()
    listener = f"{base}/optimove/events?token={TOKEN}"
    warm_target = max(1, int(RSS_WARM_FRACTION * expected))
    warm_at = None
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        with RssSampler(workers) as rss, conn.cursor() as cur:
            started = time.monotonic()
            fired_at = time.time()
            fire(session, listener, campaign_id, channels)
            deadline = started + timeout
            while (done := sent_so_far(cur, campaign_id)) < expected:
                if warm_at is None and done >= warm_target:
                    warm_at = time.monotonic()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"campaign {campaign_id}: {done}/{expected} sent after {timeout:.0f}s")
                for w in workers:
                    w.check()
                time.sleep(POLL_INTERVAL)
            seconds = time.monotonic() - started
        rss.sample()  # the end
        profile = rss_profile(rss.history, warm_at if warm_at is not None else time.monotonic())
        with conn.cursor() as cur:  # checks, outside the timing
            runs_deadline = time.monotonic() + 30
            while True:
                cur.execute("SELECT status, count(*) FROM campaign_runs WHERE campaign_id = %s GROUP BY status",
                            (campaign_id,))
                runs_by_status = dict(cur.fetchall())
                if runs_by_status == {"done": len(channels)} or time.monotonic() > runs_deadline:
                    break
                time.sleep(0.2)
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
          and by_status == {"sent": expected} and runs_by_status == {"done": len(channels)})
    first, last = peer.pop("first_received_at"), peer.pop("last_applied_at")
    return {
        "customers_per_channel": n, "channels": list(channels), "expected_sends": expected,
        "seconds": round(seconds, 3), "sends_per_s": round(expected / seconds, 1),
        "us_per_send": round(1e6 * seconds / expected, 2),
        "first_send_at_peer_s": round(first - fired_at, 3) if first is not None else None,
        "last_send_at_peer_s": round(last - fired_at, 3) if last is not None else None,
        "rss": profile, "peer": peer, "peer_counters_delta": delta, "postgres_by_status": by_status,
        "runs_by_status": runs_by_status, "ok": ok,
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


def raw_send_insert_rate(db_url: str, n: int, page_size: int, campaign_id: int, channels: tuple[int, ...],
                         method: str) -> dict:
    """Rows/s of inserting the campaign's send rows into a fresh sends-shaped table, one page per statement and
    commit: `method` "execute_values" (`INSERT … VALUES … ON CONFLICT DO NOTHING RETURNING id`, as the grant
    baseline) or "unnest" (the relay's `INSERT … SELECT FROM unnest(arrays) … ON CONFLICT DO NOTHING RETURNING`).
    Only the statements and commits are timed; each page's rows are built before its statement."""
    spec = send_campaign_spec(campaign_id, channels, n)
    table = f"bench_raw_sends_{method}"
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
            cur.execute(RAW_SENDS_TABLE.format(t=table))
            conn.commit()
            rows = inserted = 0
            seconds = 0.0
            for fixed, varying in send_pages(spec, page_size):
                size = len(next(iter(varying.values()))[1])
                names = [*fixed, *varying, "status"]
                if method == "execute_values":
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
    """The campaign's channels: 504, 505, 506 … (bonus) or 610, 611, 612 … (send)."""
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
    return [BONUS_CUSTOMERS if args.role == "bonus" else SEND_CUSTOMERS]


def run(args) -> dict:
    return run_send(args) if args.role == "send" else run_bonus(args)


def run_bonus(args) -> dict:
    sizes, channels = campaign_sizes(args), channel_ids("bonus", args.channels)
    tmp = Path(tempfile.mkdtemp(prefix="relay-campaign-bench-"))
    results, raw = [], []
    with ExitStack() as stack:
        if not args.keep_logs:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        db_url, redis_url, _, notes = start_stores(tmp, stack, appendonly=True)
        sim = start_simulator(tmp, stack, args.sim_rate_limit or args.rate_limit)
        env = relay_env(args, db_url, redis_url, sim, tmp)
        base, workers = start_relay(args, env, tmp, stack)
        campaign_id = int(time.time()) % 10 ** 6 * 10
        warm = run_campaign(base, sim, db_url, workers, campaign_id, 2000, timeout=120)
        if not warm["ok"]:
            raise RuntimeError(f"warm-up campaign wrong: {warm}")
        for i, n in enumerate(sizes, start=1):
            raw.append(raw_insert_rate(db_url, n, args.page_size, campaign_id + i, channels))
            try:
                results.append(run_campaign(base, sim, db_url, workers, campaign_id + i, n, args.timeout,
                                            channels))
            except Exception:
                for g in workers:
                    print(f"--- {g.name} (tail) ---\n{g.tail()}", file=sys.stderr)
                raise
        if args.keep_logs:
            print(f"logs in {tmp}", file=sys.stderr)
    for r, limit in zip(results, raw):
        r["raw_rows_per_s"] = limit["rows_per_s"]
        r["raw"] = limit
        r["ratio"] = round(r["customers_per_s"] / limit["rows_per_s"], 3)
    first, last = results[0], results[-1]
    growth = round(last["us_per_customer"] / first["us_per_customer"], 3)
    rss_peak = max(r["worker_rss_tree_peak_mb"] for r in results)
    targets = {
        f"ratio>={TARGET_RATIO} at every size": all(r["ratio"] >= TARGET_RATIO for r in results),
        f"worker RSS<{TARGET_RSS_MB}MB": rss_peak < TARGET_RSS_MB,
        f"per-customer cost growth<={TARGET_GROWTH}x": growth <= TARGET_GROWTH,
        "exact counts": all(r["ok"] for r in results),
    }
    exe = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    return {
        "sizes": results, "growth_per_customer": growth, "targets": targets,
        "setup": {"cpus": os.cpu_count(), "stores": ", ".join(notes), "worker_processes": args.worker_processes,
                  "worker_concurrency": args.workers, "page_size": args.page_size,
                  "bonus_batch_size": args.batch_size, "rate_limit": args.rate_limit,
                  "promo_codes": f"{'+'.join(CODES)} for every {MULTI_CODE_EVERY}nd customer, {CODES[0]} otherwise",
                  "overlap": OVERLAP, "channels": list(channels)},
        "command": " ".join(shlex.quote(a) for a in [exe, *sys.argv]),
    }


def report(res: dict) -> str:
    if res.get("role") == "send":
        return report_send(res)
    s = res["setup"]
    lines = [f"command: {res['command']}",
             f"setup:   {s['cpus']} CPUs, {s['stores']}, {s['worker_processes']} worker process(es) x prefork "
             f"{s['worker_concurrency']}, page {s['page_size']}, bonus batch {s['bonus_batch_size']}, "
             f"rate limit {s['rate_limit']}",
             f"         {len(s['channels'])} channel{'s' if len(s['channels']) != 1 else ''}, 50% overlap, codes: "
             f"{s['promo_codes']}",
             "",
             f"{'N/channel':>10}{'unique':>9}{'triples':>9}{'secs':>8}{'cust/s':>9}{'grants/s':>10}"
             f"{'us/cust':>9}{'raw rows/s':>12}{'ratio':>7}{'RSS child':>11}{'RSS tree':>10}  bonus ledger"]
    for r in res["sizes"]:
        lines.append(f"{r['customers_per_channel']:>10}{r['unique_customers']:>9}{r['expected_triples']:>9}"
                     f"{r['seconds']:>8.2f}{r['customers_per_s']:>9.0f}{r['grants_per_s']:>10.0f}"
                     f"{r['us_per_customer']:>9.1f}{r['raw_rows_per_s']:>12.0f}{r['ratio']:>7.3f}"
                     f"{r['worker_rss_child_peak_mb']:>9.1f}MB{r['worker_rss_tree_peak_mb']:>8.1f}MB  "
                     f"applied {r['bonus_applied']}, dup {r['bonus_duplicate_grants']}"
                     f"{'' if r['ok'] else '  WRONG COUNTS'}")
    lines.append("")
    rows = " / ".join(str(r["raw"]["rows"]) for r in res["sizes"])
    lines.append("raw = execute_values INSERT ... ON CONFLICT DO NOTHING RETURNING id of the same rows "
                 f"({rows}), one page per statement, fresh table, same server")
    lines.append(f"per-customer cost growth, largest vs smallest size: {res['growth_per_customer']:.3f}x")
    for name, met in res["targets"].items():
        lines.append(f"target {name}: {'met' if met else 'MISSED'}")
    return "\n".join(lines)


def run_send(args) -> dict:
    sizes, channels = campaign_sizes(args), channel_ids("send", args.channels)
    tmp = Path(tempfile.mkdtemp(prefix="relay-campaign-bench-"))
    results = []
    with ExitStack() as stack:
        if not args.keep_logs:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        db_url, redis_url, _, notes = start_stores(tmp, stack, appendonly=True)
        sim = start_simulator(tmp, stack, args.sim_rate_limit or args.rate_limit)
        env = send_env(args, relay_env(args, db_url, redis_url, sim, tmp), sim, tmp, channels)
        base, workers = start_relay(args, env, tmp, stack)
        campaign_id = int(time.time()) % 10 ** 6 * 10
        warm = run_send_campaign(base, sim, db_url, workers, campaign_id, WARMUP_CUSTOMERS, 120, channels)
        if not warm["ok"]:
            raise RuntimeError(f"warm-up send campaign wrong: {warm}")
        for i, n in enumerate(sizes, start=1):
            raw = {method: raw_send_insert_rate(db_url, n, args.page_size, campaign_id + i, channels, method)
                   for method in ("execute_values", "unnest")}
            try:
                result = run_send_campaign(base, sim, db_url, workers, campaign_id + i, n, args.timeout, channels)
            except Exception:
                for g in workers:
                    print(f"--- {g.name} (tail) ---\n{g.tail()}", file=sys.stderr)
                raise
            result["raw"] = raw
            result["raw_rows_per_s"] = raw["execute_values"]["rows_per_s"]
            result["ratio"] = round(result["sends_per_s"] / result["raw_rows_per_s"], 3)
            result["ratio_vs_unnest"] = round(result["sends_per_s"] / raw["unnest"]["rows_per_s"], 3)
            results.append(result)
        if args.keep_logs:
            print(f"logs in {tmp}", file=sys.stderr)
    growth = round(results[-1]["us_per_send"] / results[0]["us_per_send"], 3)
    rss_peak = max(r["rss"]["tree_max_mb"] for r in results)
    targets = {
        f"ratio>={TARGET_RATIO} at every size": all(r["ratio"] >= TARGET_RATIO for r in results),
        f"worker RSS<{TARGET_RSS_MB}MB": rss_peak < TARGET_RSS_MB,
        f"worker RSS flat (max <= RSS at {RSS_WARM_FRACTION:.0%} sent + {TARGET_RSS_FLAT_MB} MB) at every size":
            all(r["rss"]["growth_after_warm_mb"] <= TARGET_RSS_FLAT_MB for r in results),
    }
    if len(results) > 1:
        targets[f"per-send cost growth<={TARGET_GROWTH}x"] = growth <= TARGET_GROWTH
    targets["exact counts"] = all(r["ok"] for r in results)
    exe = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    return {
        "role": "send", "sizes": results, "growth_per_send": growth, "targets": targets,
        "setup": {"cpus": os.cpu_count(), "stores": ", ".join(notes), "worker_processes": args.worker_processes,
                  "worker_concurrency": args.workers, "page_size": args.page_size,
                  "send_batch_size": args.batch_size, "send_mode": "batch", "rate_limit": args.rate_limit,
                  "channels": list(channels), "channel_config": send_channel_config(channels),
                  "templates": list(SEND_TEMPLATES), "attributes": list(SEND_ATTRIBUTES),
                  "attribute_form": SEND_ATTRIBUTE_FORM, "due_now_fraction": 1.0, "overlap": 0.0,
                  "rss_interval_s": RSS_INTERVAL, "poll_interval_s": POLL_INTERVAL},
        "command": " ".join(shlex.quote(a) for a in [exe, *sys.argv]),
    }


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def report_send(res: dict) -> str:
    s = res["setup"]
    lines = [f"command: {res['command']}",
             f"setup:   {s['cpus']} CPUs, {s['stores']}, {s['worker_processes']} worker process(es) x prefork "
             f"{s['worker_concurrency']}, page {s['page_size']}, send batch {s['send_batch_size']} (SEND_MODE "
             f"{s['send_mode']}), rate limit {s['rate_limit']}",
             f"         flow 1 (pre-scheduled sends): {len(s['channels'])} send channel(s) "
             f"{', '.join(map(str, s['channels']))}, no overlap, attributes {','.join(s['attributes'])} "
             f"({s['attribute_form']} list/string form), templates {','.join(map(str, s['templates']))}, "
             f"every send due now",
             "",
             f"{'N/channel':>10}{'sends':>9}{'secs':>8}{'sends/s':>9}{'us/send':>9}{'raw rows/s':>12}{'ratio':>7}"
             f"{'1st@peer':>10}{'last@peer':>11}  send service / Postgres"]
    for r in res["sizes"]:
        p = r["peer"]
        lines.append(f"{r['customers_per_channel']:>10}{r['expected_sends']:>9}{r['seconds']:>8.2f}"
                     f"{r['sends_per_s']:>9.0f}{r['us_per_send']:>9.1f}{r['raw_rows_per_s']:>12.0f}"
                     f"{r['ratio']:>7.3f}{_secs(r['first_send_at_peer_s']):>10}{_secs(r['last_send_at_peer_s']):>11}  "
                     f"once {p['sent_once']}, dup {p['duplicates']}, early {p['early']}, missing {p['missing']} / "
                     f"sent {r['postgres_by_status'].get('sent', 0)}"
                     f"{'' if r['ok'] else '  WRONG COUNTS'}")
    lines += ["", f"worker RSS, whole tree (largest pool child), sampled every {s['rss_interval_s']:g} s:"]
    for r in res["sizes"]:
        m = r["rss"]
        lines.append(f"{r['customers_per_channel']:>10}: start {m['tree_start_mb']:.1f} ({m['child_start_mb']:.1f})"
                     f", at {RSS_WARM_FRACTION:.0%} sent {m['tree_warm_mb']:.1f} ({m['child_warm_mb']:.1f})"
                     f", max {m['tree_max_mb']:.1f} ({m['child_max_mb']:.1f})"
                     f", end {m['tree_end_mb']:.1f} ({m['child_end_mb']:.1f}) MB"
                     f"; max - at {RSS_WARM_FRACTION:.0%} = {m['growth_after_warm_mb']:+.1f} MB, "
                     f"{m['samples']} samples")
    lines.append(f"RSS flat means: tree max <= tree RSS once {RSS_WARM_FRACTION:.0%} of the sends are recorded "
                 f"(the first pages claimed and delivered) + {TARGET_RSS_FLAT_MB} MB")
    lines.append("")
    rows = " / ".join(str(r["raw"]["execute_values"]["rows"]) for r in res["sizes"])
    lines.append("secs = first notification posted -> Postgres records the last send `sent` (runs' sent counters, "
                 f"polled every {s['poll_interval_s'] * 1000:g} ms); 1st/last@peer = the fake send service's receive "
                 "time of the first send / of the call that applied the last one, from the same start")
    lines.append("raw = execute_values INSERT ... ON CONFLICT DO NOTHING RETURNING id of the same rows "
                 f"({rows}: the relay's own parsed pages, keys and columns, built outside the timing), one page "
                 "per statement and commit, fresh sends-shaped table (same columns, defaults and unique constraint, "
                 "no secondary indexes), same server")
    lines.append("raw unnest (the relay's own INSERT ... SELECT FROM unnest ... ON CONFLICT shape, for reference): "
                 + ", ".join(f"{r['raw']['unnest']['rows_per_s']:.0f} rows/s (ratio {r['ratio_vs_unnest']:.3f})"
                             for r in res["sizes"]))
    lines.append("exactness: each expected (channel, customer, template) applied exactly once at the fake send "
                 "service with its attributes and ScheduledTime, none early, rejected or unexpected; Postgres "
                 "sends all `sent`, count = expected; every run `done`")
    for r in res["sizes"]:
        if not r["ok"]:
            lines.append(f"  {r['customers_per_channel']}: peer {r['peer']}, counters {r['peer_counters_delta']}, "
                         f"Postgres {r['postgres_by_status']}, runs {r['runs_by_status']}")
    if len(res["sizes"]) > 1:
        lines.append(f"per-send cost growth, largest vs smallest size: {res['growth_per_send']:.3f}x")
    for name, met in res["targets"].items():
        lines.append(f"target {name}: {'met' if met else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("bonus", "send"), default="bonus",
                        help="bonus: flow 3 grants (504-506); send: flow 1 pre-scheduled sends (610-612)")
    parser.add_argument("--customers", type=int, default=None,
                        help="customers per channel, one campaign (without --sizes; default 300000 for bonus "
                        "with --sizes '', 100000 for send)")
    parser.add_argument("--sizes", default=None, help="comma-separated customers per channel, one campaign each "
                        "(default 100000,300000 for bonus unless --customers is given; --customers for send)")
    parser.add_argument("--channels", type=int, default=3, choices=range(1, 11), metavar="1..10",
                        help="channels of the campaign (504.. for bonus, 610.. for send)")
    parser.add_argument("--workers", type=int, default=2, help="prefork concurrency of each worker process")
    parser.add_argument("--worker-processes", type=int, default=1, help="`relay worker` processes")
    parser.add_argument("--page-size", type=int, default=10_000, help="OPTIMOVE_PAGE_SIZE")
    parser.add_argument("--batch-size", type=int, default=5000, help="BONUS_BATCH_SIZE (SEND_BATCH_SIZE with "
                        "--role send)")
    parser.add_argument("--rate-limit", default="100000/1s", help="OPTIMOVE_RATE_LIMIT (and the simulator's)")
    parser.add_argument("--sim-rate-limit", default=None, help="the simulator's --rate-limit if different")
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
