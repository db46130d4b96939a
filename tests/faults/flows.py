"""Per-flow scenarios for the fault tests that break every flow (`test_every_flow_restarts.py`).

A scenario is one run of one flow against real relay processes: the settings it needs, the
processes it starts (web, the worker a fault aims at, beat), how the run is started (a campaign
fired, or a simulator driver in a background thread), how far it has got in Postgres, when it is
done, what was lost or duplicated at the fake peer, and the exact final checks. The tests inject
the faults; the scenarios reuse `tests.faults.support` and the simulator's drivers.

    flow 1  ScheduledSends  EventTypeID 13 on send channels: timed sends, some due at once, the rest
                            falling due over the next seconds (`support.create_send_campaign`)
    flow 2  Realtime(send)  a burst of EventTypeID 11 on a send channel (`simulator.realtime.run_realtime`)
    flow 4  Conditional     EventTypeID 5 with a ClearanceRequiredBy far enough ahead for any recovery
                            (`simulator.conditional_driver.run_conditional`)
    flow 5  Realtime(bonus) a burst of EventTypeID 11 on a bonus channel
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import redis

from cli.supervisor import REALTIME_POOL
from shared import dispatch
from simulator import campaigns
from simulator.conditional_driver import CODES as CONDITIONAL_CODES, conditional_spec, run_conditional
from simulator.realtime import trigger_body, run_realtime
from tests.conftest import TOKEN, count, poll
from tests.faults.support import (API_KEY, assert_sends_exact, create_send_campaign, fire_sends, measured_sends,
                                  send_channel_config, send_statuses, start_web, wait_sends_done)
from tests.harness import relay_env

FAST_LIMIT = (1000, 10.0)  # the Optimove limit is not under test here (test_rate_limit.py is)
SEND_CHANNELS = (610, 611, 612)  # send channels (events 13 and 11); any other channel is a bonus channel
BONUS_CHANNEL = 600
# the sweeper re-drives what nobody touched for 3 s; unacked Redis messages stay invisible for 120 s
RECOVERY = {"RELAY_SWEEP_AFTER": 3, "RELAY_SWEEP_INTERVAL": 1, "RELAY_VISIBILITY_TIMEOUT": 120,
            "RELAY_RELEASE_INTERVAL": 1}
CAMPAIGN_QUEUES = ",".join(dispatch.CAMPAIGN_QUEUES)


class Scenario:
    """One run of one flow. Subclasses set `flow`, `unit` (what `progress` counts) and `total`."""

    flow: int
    title: str
    unit: str
    total: int
    started: float
    worker_queues: tuple[str, ...] = dispatch.QUEUES  # what the worker the faults aim at consumes
    refusals_allowed = False  # set while Postgres restarts: the listener may answer 503 meanwhile

    def __init__(self, make_simulator, tmp_path, campaign_id: int, pool_children: bool = False):
        self.tmp_path, self.campaign_id, self.pool_children = tmp_path, campaign_id, pool_children
        self.sim = self.simulator(make_simulator)

    def simulator(self, make_simulator):
        raise NotImplementedError

    # -- processes ------------------------------------------------------------------------

    def env(self, database_url: str, redis_url: str, **extra) -> dict[str, str]:
        """The relay's environment: this simulator, a fast Optimove limit, short sweep ages."""
        sim = self.sim
        return relay_env(database_url, redis_url, OPTIMOVE_API_URL=sim.optimove_url, OPTIMOVE_API_KEY=API_KEY,
                         OPTIMOVE_RATE_LIMIT="1000/10s", BONUS_URL=sim.bonus_url, BONUS_MODE="batch",
                         SEND_URL=sim.send_url, SEND_MODE="batch",
                         RELAY_CHANNEL_CONFIG=send_channel_config(self.tmp_path, SEND_CHANNELS),
                         OPTIMOVE_PAGE_SIZE=200, BONUS_BATCH_SIZE=200, SEND_BATCH_SIZE=100,
                         **{**RECOVERY, **extra})

    def start(self, procs, env) -> str:
        """Web, the worker the faults aim at (named `worker`), beat; the listener's base URL once the workers
        answer (so the run starts with its workers, and a fault lands in the run, not in their start-up)."""
        base = start_web(procs, env)
        self.start_worker(procs, env)
        procs.start("beat", ["beat", "--schedule-file", str(self.tmp_path / "beat")], env)
        wait_workers_ready(env["REDIS_URL"], [procs.procs[name] for name in procs.procs if "worker" in name])
        return base

    def start_worker(self, procs, env, name: str = "worker"):
        """The worker that does the flow's work (and its replacement after a fault): every queue, prefork 2."""
        return procs.worker(env, name=name)

    # -- the run --------------------------------------------------------------------------

    def begin(self, base: str) -> None:
        """Start the run (the notifications fired, or a driver started in a thread)."""
        raise NotImplementedError

    def progress(self, db) -> int:
        """How many of the `total` ledger rows are claimed so far (Postgres)."""
        raise NotImplementedError

    def at_fault(self, db) -> str:
        """What the run had done when the fault hit (for the figures line)."""
        return f"{self.progress(db)} of {self.total} {self.unit}"

    def wait_done(self, db, timeout: float) -> None:
        """Until Postgres says the run is over (fails at once on parked work)."""
        raise NotImplementedError

    def measured(self, db) -> dict:
        """`lost` and `duplicates` at the fake peer (measured, not asserted), and other figures."""
        raise NotImplementedError

    def assert_exact(self, db, measured: dict) -> str:
        """The invariants; returns the peer's figures for the printed line."""
        raise NotImplementedError


# -- flow 1: scheduled sends ----------------------------------------------------------------

class ScheduledSends(Scenario):
    """Three send channels of 1,500 customers; the campaign's clock started 4 s before the notifications,
    so about two thirds of the sends are due at once and the rest fall due over the next 8 s."""

    flow, title, unit = 1, "scheduled send", "sends claimed"
    CUSTOMERS, BEHIND_S, SPREAD_S = 1500, 4.0, 12.0

    def simulator(self, make_simulator):
        return make_simulator(rate_limit=FAST_LIMIT, send_faults={"latency_ms": 150})

    def begin(self, base: str) -> None:
        self.campaign = create_send_campaign(self.sim, self.campaign_id, SEND_CHANNELS, self.CUSTOMERS,
                                             start=time.time() - self.BEHIND_S, spread=self.SPREAD_S)
        self.total = len(self.campaign.expected)
        self.started = time.monotonic()
        fire_sends(base, self.campaign)

    def progress(self, db) -> int:
        return count(db, "SELECT count(*) FROM sends WHERE campaign_id = %s", self.campaign_id)

    def at_fault(self, db) -> str:
        statuses = send_statuses(db, self.campaign_id)
        return (f"{sum(statuses.values())} of {self.total} sends claimed ({statuses.get('sent', 0)} sent, "
                f"{statuses.get('waiting', 0)} not due yet)")

    def wait_done(self, db, timeout: float) -> None:
        wait_sends_done(db, self.campaign, timeout)

    def measured(self, db) -> dict:
        lost, duplicates = measured_sends(self.sim, self.campaign)
        return {"lost": lost, "duplicates": duplicates}

    def assert_exact(self, db, measured: dict) -> str:
        summary = assert_sends_exact(db, self.sim, self.campaign)
        return (f"send calls {summary['calls']}, items {summary['items_received']}, late (due after the "
                f"notification) max {summary['late_seconds_future']['max']}s")


# -- flows 2 and 5: real-time triggers --------------------------------------------------------

class Realtime(Scenario):
    """A burst of EventTypeID 11 (10/s for 8 s, every 5th re-sent) on send channel 610 (flow 2) or bonus
    channel 600 (flow 5), fired by `run_realtime` in a background thread. The worker the faults aim at
    serves the `realtime` queue as under `relay up` (solo pool), or prefork 2 when a fault needs pool
    children; a second worker serves the other queues (the sweeper and the release job run there)."""

    unit = "effects claimed"
    worker_queues = (dispatch.REALTIME,)
    RATE, DURATION, DUPLICATE_EVERY = 10.0, 8.0, 5
    PEER_LATENCY_MS = 20

    def __init__(self, role: str, make_simulator, tmp_path, campaign_id: int, pool_children: bool = False):
        self.role = role
        self.flow = 2 if role == "send" else 5
        self.title = f"real-time {role}"
        self.table, self.done = ("sends", "sent") if role == "send" else ("grants", "granted")
        self.channel = SEND_CHANNELS[0] if role == "send" else BONUS_CHANNEL
        super().__init__(make_simulator, tmp_path, campaign_id, pool_children)
        self.peer = self.sim.send if role == "send" else self.sim.bonus
        self.admin_url = self.sim.send_admin_url if role == "send" else self.sim.bonus_admin_url
        self.triggers = round(self.RATE * self.DURATION)
        self.total = sum(self.effects_of(index) for index in range(self.triggers))
        self.summary: dict | None = None
        self.error: BaseException | None = None

    def simulator(self, make_simulator):
        if self.role == "send":
            return make_simulator(rate_limit=FAST_LIMIT, send_faults={"latency_ms": self.PEER_LATENCY_MS})
        return make_simulator(rate_limit=FAST_LIMIT, latency_ms=self.PEER_LATENCY_MS)

    def effects_of(self, index: int) -> int:
        """Ledger rows (and peer effects) the driver's trigger number `index` asks for."""
        if self.role == "send":
            return 1
        return len(trigger_body(self.role, index, self.campaign_id, self.channel, "c", "t")[1])

    def start(self, procs, env) -> str:
        procs.start("campaign-worker", ["worker", "--queues", CAMPAIGN_QUEUES, "--concurrency", "1"], env)
        return super().start(procs, env)

    def start_worker(self, procs, env, name: str = "worker"):
        pool = ["--pool", "prefork", "--concurrency", "2"] if self.pool_children else REALTIME_POOL
        return procs.start(name, ["worker", "--queues", dispatch.REALTIME, *pool], env)

    def begin(self, base: str) -> None:
        listener = f"{base}/optimove/events?token={TOKEN}"

        def drive():
            try:
                self.summary = run_realtime(listener, self.admin_url, self.role, self.channel,
                                            campaign_id=self.campaign_id, rate=self.RATE, duration=self.DURATION,
                                            duplicate_every=self.DUPLICATE_EVERY, timeout=90)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread by wait_done
                self.error = exc

        self.driver = threading.Thread(target=drive, name=f"realtime-{self.role}-driver", daemon=True)
        self.started = time.monotonic()
        self.driver.start()

    def progress(self, db) -> int:
        return count(db, f"SELECT count(*) FROM {self.table} WHERE campaign_id = %s", self.campaign_id)

    def at_fault(self, db) -> str:
        received = count(db, "SELECT count(*) FROM notifications WHERE campaign_id = %s", self.campaign_id)
        return f"{self.progress(db)} of {self.total} {self.unit} ({received} of {self.triggers} triggers received)"

    def wait_done(self, db, timeout: float) -> None:
        self.driver.join(timeout)
        assert not self.driver.is_alive(), "the real-time driver did not finish"
        if self.error is not None:
            raise self.error

        def settled():
            statuses = dict(_rows(db, "SELECT status, count(*) FROM notifications WHERE campaign_id = %s "
                                      "GROUP BY 1", self.campaign_id))
            assert not statuses.get("failed"), f"notification(s) parked: {statuses}"
            claimed = count(db, f"SELECT count(*) FROM {self.table} WHERE campaign_id = %s AND status = 'claimed'",
                            self.campaign_id)
            return set(statuses) == {"done"} and claimed == 0

        poll(settled, timeout, 0.1, "every notification done and every ledger row settled")

    def _entries(self) -> list[dict]:
        return self.peer.summary(full=True, campaign_id=self.campaign_id)["entries"]

    def measured(self, db) -> dict:
        entries = self._entries()
        duplicates = sum(max(0, entry["applications"] - 1) for entry in entries)
        if self.summary is None:  # the driver never finished: count against every trigger it was to fire
            return {"lost": self.total - sum(1 for entry in entries if entry["applications"]),
                    "duplicates": duplicates}
        return {"lost": self.summary["expected_effects"] - self.summary["effects_seen"], "duplicates": duplicates}

    def assert_exact(self, db, measured: dict) -> str:
        s = self.summary
        refused = set(s["errors"]) - ({"503"} if self.refusals_allowed else set())
        assert not refused, s["errors"]
        assert not s["timed_out"] and s["lost"] == 0 and s["duplicate_effects"] == 0, s
        assert measured == {"lost": 0, "duplicates": 0}, measured
        if not self.refusals_allowed:
            assert s["ok"] and s["accepted"] == self.triggers and s["expected_effects"] == self.total, s
        # each stored notification (every one acknowledged, and any the listener committed but could not
        # answer while Postgres went down) is done and has its trigger's rows, every one settled once
        notifications = dict(_rows(db, "SELECT id, status FROM notifications WHERE campaign_id = %s",
                                   self.campaign_id))
        assert set(notifications.values()) == {"done"}, Counter(notifications.values())
        assert s["accepted"] <= len(notifications) <= self.triggers
        rows = _rows(db, f"SELECT notification_id, customer_id, status FROM {self.table} WHERE campaign_id = %s",
                     self.campaign_id)
        assert {status for _, _, status in rows} == {self.done}, Counter(status for _, _, status in rows)
        per_notification = Counter(notification for notification, _, _ in rows)
        assert set(per_notification) == set(notifications), "a notification without its ledger rows, or the reverse"
        customers = {notification: customer for notification, customer, _ in rows}
        assert len(set(customers.values())) == len(notifications), "a customer's trigger stored twice"
        for notification, n in per_notification.items():
            assert n == self.effects_of(int(customers[notification][-6:])), (notification, n)
        entries = self._entries()
        applied = [entry for entry in entries if entry["applications"]]
        assert len(applied) == len(rows) and all(entry["applications"] == 1 for entry in applied), len(applied)
        assert count(db, "SELECT count(*) FROM campaign_runs WHERE campaign_id = %s", self.campaign_id) == 0
        ledger = self.peer.summary()
        return (f"{s['accepted']} of {s['sent']} triggers accepted"
                + (f" ({s['errors']} refused)" if s["errors"] else "")
                + f", {len(rows)} effects; peer calls {ledger['calls']}, items {ledger['items_received']}; "
                  f"202 to first call p50 {s['latency_ms']['p50']} ms, max {s['latency_ms']['max']} ms")


# -- flow 4: conditional execution ----------------------------------------------------------

class Conditional(Scenario):
    """EventTypeID 5 for 4,000 customers (every 2nd holds both codes, every 25th also a code the bonus
    system rejects) with ClearanceRequiredBy 45 s ahead: recovery must fit well before it (the relay
    stops paging 15 s before it, to leave time for the reports). `run_conditional` runs in a thread and
    returns once every customer is reported (or 5 s after the deadline)."""

    flow, title, unit = 4, "conditional", "grants claimed"
    CUSTOMERS, REJECT_EVERY, DEADLINE_IN = 4000, 25, 45.0

    def __init__(self, make_simulator, tmp_path, campaign_id: int, pool_children: bool = False):
        super().__init__(make_simulator, tmp_path, campaign_id, pool_children)
        self.spec = campaigns.validate_spec(conditional_spec(campaign_id, self.CUSTOMERS, CONDITIONAL_CODES, 2,
                                                             self.REJECT_EVERY))
        numbers = campaigns.audience_numbers(self.spec)
        self.total = campaigns.expected_triples(self.spec)
        self.refused = sum(campaigns.holds_extra_code(self.spec, n) for n in numbers)  # REJECT_CODE grants
        self.summary: dict | None = None
        self.error: BaseException | None = None

    def simulator(self, make_simulator):
        return make_simulator(rate_limit=FAST_LIMIT, latency_ms=150)

    def begin(self, base: str) -> None:
        listener = f"{base}/optimove/events?token={TOKEN}"

        def drive():
            try:
                self.summary = run_conditional(listener, self.sim.optimove_url, self.sim.bonus_admin_url,
                                               customers=self.CUSTOMERS, deadline_in=self.DEADLINE_IN,
                                               campaign_id=self.campaign_id, reject_every=self.REJECT_EVERY,
                                               timeout=5)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread by wait_done
                self.error = exc

        self.driver = threading.Thread(target=drive, name="conditional-driver", daemon=True)
        self.started = time.monotonic()
        self.driver.start()

    def progress(self, db) -> int:
        return count(db, "SELECT count(*) FROM grants WHERE campaign_id = %s", self.campaign_id)

    def wait_done(self, db, timeout: float) -> None:
        self.driver.join(timeout)
        assert not self.driver.is_alive(), "the conditional driver did not finish"
        if self.error is not None:
            raise self.error
        poll(lambda: _rows(db, "SELECT status FROM campaign_runs WHERE campaign_id = %s AND status <> 'running'",
                           self.campaign_id), timeout, 0.1, "the conditional run ended")

    def measured(self, db) -> dict:
        entries = self.sim.bonus.summary(full=True, campaign_id=self.campaign_id)["entries"]
        applied = sum(1 for entry in entries if entry["applications"])
        return {"lost": (self.total - self.refused) - applied,
                "duplicates": sum(max(0, entry["applications"] - 1) for entry in entries)}

    def assert_exact(self, db, measured: dict) -> str:
        s = self.summary
        assert measured == {"lost": 0, "duplicates": 0}, measured
        approved, refused = self.CUSTOMERS - self.refused, self.refused
        assert not s["timed_out"] and s["ok"], {k: v for k, v in s.items() if not isinstance(v, list)}
        assert s["approved_before_deadline"] == s["expected_approved"] == approved, s
        assert s["approved_after_deadline"] == 0 and s["grants_after_deadline"] == 0, s
        assert s["report_calls_after_deadline"] == 0, s
        assert s["unreported"] == 0 and s["reported_false"] == s["expected_false"] == refused, s
        assert s["missed"] == 0 and s["approved_without_grant"] == 0 and s["duplicate_grants"] == 0, s
        with db.cursor() as cur:
            cur.execute("SELECT status, count(*) FROM grants WHERE campaign_id = %s GROUP BY 1", (self.campaign_id,))
            assert dict(cur.fetchall()) == {"granted": self.total - refused, "rejected": refused}
            cur.execute("SELECT status, count(*) FROM notifications WHERE campaign_id = %s GROUP BY 1",
                        (self.campaign_id,))
            assert dict(cur.fetchall()) == {"done": 1}
            cur.execute("SELECT count(*), count(reported_at), count(*) FILTER (WHERE status) FROM promotion_statuses "
                        "WHERE campaign_id = %s", (self.campaign_id,))
            assert cur.fetchone() == (self.CUSTOMERS, self.CUSTOMERS, approved)
            cur.execute("""SELECT status, fetch_done, fetched, claimed, duplicates_skipped, granted, rejected, failed,
                                  expired, reported_true, reported_false
                           FROM campaign_runs WHERE campaign_id = %s""", (self.campaign_id,))
            assert cur.fetchall() == [("done", True, self.CUSTOMERS, self.total, 0, self.total - refused, refused,
                                       0, 0, approved, refused)]
        return (f"{s['approved_before_deadline']} approved and {s['reported_false']} reported false before the "
                f"deadline, 0 after; {s['report_calls']} report calls; {s['grants_applied']} grants")


def scenario(flow: int, make_simulator, tmp_path, campaign_id: int, pool_children: bool = False) -> Scenario:
    """The scenario of `flow` (1, 2, 4 or 5)."""
    if flow == 1:
        return ScheduledSends(make_simulator, tmp_path, campaign_id, pool_children)
    if flow in (2, 5):
        return Realtime("send" if flow == 2 else "bonus", make_simulator, tmp_path, campaign_id, pool_children)
    if flow == 4:
        return Conditional(make_simulator, tmp_path, campaign_id, pool_children)
    raise ValueError(f"no scenario for flow {flow}")


FLOW_IDS = {1: "flow1_scheduled_send", 2: "flow2_realtime_send", 4: "flow4_conditional", 5: "flow5_realtime_bonus"}


# -- helpers ----------------------------------------------------------------------------------

def _rows(db, sql: str, *args) -> list[tuple]:
    with db.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def unacked(redis_url: str, queues=dispatch.QUEUES) -> Counter:
    """Tasks of `queues` taken from the Redis broker and not acknowledged yet (kombu's `unacked` hash holds
    [message, exchange, routing key] per delivery), by task name."""
    import json

    client = redis.Redis.from_url(redis_url)
    try:
        entries = [json.loads(raw) for raw in client.hvals("unacked")]
    finally:
        client.close()
    return Counter(message["headers"]["task"] for message, _, queue in entries if queue in queues)


def freeze_holding_work(proc, redis_url: str, queues=dispatch.QUEUES, timeout: float = 15.0,
                        until=bool) -> tuple[Counter, int]:
    """SIGSTOP the worker's process group until, frozen, the unacknowledged tasks of `queues` it holds satisfy
    `until` (default: at least one; each try thaws it and looks again 20 ms later); return (those tasks, tries).
    Frozen, it can neither ack nor take anything, so what the caller SIGKILLs next is exactly that."""
    deadline = time.monotonic() + timeout
    tries = 0
    while True:
        tries += 1
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            held = unacked(redis_url, queues)
        except BaseException:
            os.killpg(proc.pid, signal.SIGCONT)
            raise
        if until(held):
            return held, tries
        os.killpg(proc.pid, signal.SIGCONT)
        assert time.monotonic() < deadline, f"never caught the worker holding the tasks wanted (last {held})"
        time.sleep(0.02)  # between two looks at a running worker (not a wait for a result)


def wait_workers_ready(broker_url: str, workers, timeout: float = 60.0) -> None:
    """Until each of the `relay worker` processes `workers` answers a Celery ping through the broker."""
    import socket

    from celery import Celery

    wanted = {f"relay-{proc.pid}@{socket.gethostname()}" for proc in workers}

    def answered():
        app = Celery(broker=broker_url)  # a new connection each time: a try that fails is only "not yet"
        try:
            return wanted <= {name for reply in app.control.ping(timeout=0.5) for name in reply}
        except Exception:  # noqa: BLE001 - e.g. "Connection closed by server", seen twice on a busy machine
            return False
        finally:
            app.close()

    poll(answered, timeout, 0.1, f"workers {sorted(wanted)} to answer a ping")


def kill_child_mid_task(proc, broker_url: str, timeout: float = 30.0) -> tuple[str, str, int, int]:
    """SIGKILL one prefork pool child of the worker `proc` while it runs a task; return (the task's name and id,
    the child's pid, tries). Each try freezes the children (SIGSTOP), asks the worker's main process which tasks
    its children run (Celery's `inspect active`, which it answers while they are frozen), kills a child
    named there and thaws the rest; a try that finds every child between two tasks thaws them and looks
    again 20 ms later."""
    import socket

    import psutil
    from celery import Celery

    app = Celery(broker=broker_url)
    node = f"relay-{proc.pid}@{socket.gethostname()}"
    deadline = time.monotonic() + timeout
    tries = 0
    try:
        while True:
            tries += 1
            children = psutil.Process(proc.pid).children()
            for child in children:
                child.suspend()
            try:
                pids = {child.pid: child for child in children}
                try:
                    replies = app.control.inspect([node], timeout=1.0, limit=1).active() or {}
                except Exception:  # noqa: BLE001 - a broker hiccup: look again
                    replies = {}
                running = [task for tasks in replies.values() for task in tasks if task.get("worker_pid") in pids]
                if running:
                    task = running[0]
                    pids[task["worker_pid"]].kill()  # a stopped process dies at once; Celery forks a new child
                    return task["name"], task["id"], task["worker_pid"], tries
            finally:
                for child in children:
                    try:
                        child.resume()
                    except psutil.NoSuchProcess:
                        pass
            assert time.monotonic() < deadline, "never caught a pool child running a task"
            time.sleep(0.02)  # between two looks at a running worker (not a wait for a result)
    finally:
        app.close()
