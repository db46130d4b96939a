"""Metrics: the counting helpers, their one-line call sites (Optimove client, limiter, HTTP adapters), the
scrape-time collectors (fakeredis for the broker), and a worker's own metrics port in multiprocess mode."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import fakeredis
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from shared import metrics
from shared.adapters.bonus import GrantItem, HttpBonusAdapter, HttpRevokeAdapter, RevokeItem
from shared.adapters.send import HttpSendAdapter, SendItem
from shared.optimove.client import OptimoveClient, RateLimited, TemporaryError, Throttled
from shared.settings import Secret
from tests.conftest import ROOT
from tests.stub_server import StubServer
from web.metrics import PRIORITY_SEPARATOR, StoreCollector, broker_client, queue_depths, queue_keys


def value(name: str, **labels) -> float:
    """A sample of the default registry (0 when the series does not exist yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Moves:
    """The change of some samples between `__init__` and `delta`."""

    def __init__(self, *samples: tuple):
        self.samples = samples
        self.before = [value(name, **labels) for name, labels in samples]

    def delta(self) -> list[float]:
        return [value(name, **labels) - b for (name, labels), b in zip(self.samples, self.before)]


# -- helpers ---------------------------------------------------------------------------------------

def test_flow_of_maps_ledger_sources_to_flow_names():
    assert metrics.flow_of("grants", "realtime") == "realtime_bonus"
    assert metrics.flow_of("sends", "realtime") == "realtime_send"
    assert metrics.flow_of("sends", "scheduled") == "scheduled_send"
    for source in ("scheduled_bonus", "conditional", "cancellation", "deactivation"):
        assert metrics.flow_of("grants" if source != "cancellation" else "revokes", source) == source


def test_ledger_settled_counts_each_outcome_of_the_right_ledger_and_flow():
    grants = [("relay_grants_total", {"flow": "scheduled_bonus", "outcome": o})
              for o in ("granted", "rejected", "failed", "retry", "expired")]
    sends = [("relay_sends_total", {"flow": "realtime_send", "outcome": o}) for o in ("sent", "rejected")]
    revokes = [("relay_revokes_total", {"flow": "cancellation", "outcome": "revoked"})]
    moves = Moves(*grants, *sends, *revokes)
    metrics.ledger_settled("grants", "scheduled_bonus", done=5, rejected=2, failed=1, retry=3)
    metrics.ledger_settled("grants", "scheduled_bonus", expired=4)
    metrics.ledger_settled("sends", "realtime", done=7, rejected=1)
    metrics.ledger_settled("revokes", "cancellation", done=2)
    assert moves.delta() == [5, 2, 1, 3, 4, 7, 1, 2]


def test_after_commit_runs_on_commit_only():
    engine = sa.create_engine("sqlite://")
    ran = []
    with engine.begin() as conn:
        metrics.after_commit(conn, lambda: ran.append("first"))
        conn.execute(sa.text("SELECT 1"))
        assert ran == []  # not before the commit
    assert ran == ["first"]
    with pytest.raises(ZeroDivisionError):
        with engine.begin() as conn:
            metrics.after_commit(conn, lambda: ran.append("rolled back"))
            1 / 0
    with engine.begin() as conn:  # a later transaction does not run the rolled-back one's callback
        conn.execute(sa.text("SELECT 1"))
    assert ran == ["first"]
    metrics.after_commit(object(), lambda: ran.append("no transaction"))  # not a Connection: at once
    assert ran == ["first", "no transaction"]
    with engine.begin() as conn:  # a failing callback never fails the commit
        metrics.after_commit(conn, lambda: 1 / 0)
    engine.dispose()


def test_claimed_counts_claims_and_duplicates_after_commit():
    engine = sa.create_engine("sqlite://")
    moves = Moves(("relay_claims_total", {"ledger": "grants", "flow": "realtime_bonus"}),
                  ("relay_duplicates_skipped_total", {"flow": "realtime_bonus"}))
    with engine.begin() as conn:
        metrics.claimed(conn, "grants", "realtime", won=3, asked=5)
        assert moves.delta() == [0, 0]
    assert moves.delta() == [3, 2]
    with pytest.raises(RuntimeError), engine.begin() as conn:
        metrics.claimed(conn, "grants", "realtime", won=9, asked=9)
        raise RuntimeError
    assert moves.delta() == [3, 2]
    engine.dispose()


def test_runs_and_notifications():
    from datetime import datetime, timedelta

    engine = sa.create_engine("sqlite://")
    count = ("relay_run_duration_seconds_count", {"flow": "conditional", "status": "deadline_missed"})
    total = ("relay_run_duration_seconds_sum", {"flow": "conditional", "status": "deadline_missed"})
    done = ("relay_notifications_processed_total", {"event_type": "13", "status": "done"})
    moves = Moves(count, total, done)
    start = datetime(2026, 1, 1, 10, 0, 0)
    with engine.begin() as conn:
        metrics.run_row_ended(conn, {"flow": "conditional", "status": "deadline_missed", "created_at": start,
                                     "finished_at": start + timedelta(seconds=90)})
        metrics.run_row_ended(conn, {"flow": "conditional", "status": "deadline_missed", "seconds": 10.5})
        metrics.run_row_ended(conn, None)  # a run that was not running: nothing
        metrics.notification_finished(conn, 13, "done")
    assert moves.delta() == [2, 100.5, 1]
    engine.dispose()


# -- call sites: the Optimove client and the limiter -----------------------------------------------

class OptimoveStub(StubServer):
    def __init__(self):
        super().__init__("/current/")


@pytest.fixture
def optimove():
    server = OptimoveStub()
    yield server
    server.close()


def test_optimove_calls_by_function_and_status_with_latency_and_429s(optimove):
    fn = "GetCustomerExecutionDetailsByCampaign"
    moves = Moves(("relay_optimove_calls_total", {"function": fn, "status": "200"}),
                  ("relay_optimove_calls_total", {"function": fn, "status": "429"}),
                  ("relay_optimove_calls_total", {"function": fn, "status": "503"}),
                  ("relay_optimove_429_total", {}),
                  ("relay_optimove_call_seconds_count", {"function": fn}))
    answers = iter([(200, {}, b"[]"), (429, {"Retry-After": "2"}, b"slow down"), (503, {}, b"down")])
    optimove.reply = lambda req: next(answers)
    client = OptimoveClient(optimove.url, Secret("k" * 20), timeout=2)
    assert client.fetch_page("customers", fn, {}, 0, 10) == []
    with pytest.raises(Throttled):
        client.fetch_page("customers", fn, {}, 0, 10)
    with pytest.raises(TemporaryError):
        client.fetch_page("customers", fn, {}, 0, 10)
    client.close()
    assert moves.delta() == [1, 1, 1, 1, 3]


def test_optimove_timeouts_and_connection_errors_are_counted():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fn = "GetChannelTemplates"
    moves = Moves(("relay_optimove_calls_total", {"function": fn, "status": "connection_error"}),
                  ("relay_optimove_calls_total", {"function": fn, "status": "timeout"}))
    client = OptimoveClient(f"http://127.0.0.1:{port}/current", Secret("k" * 20), timeout=1)
    with pytest.raises(TemporaryError):
        client.get("integrations", fn)
    client.close()
    listener = socket.socket()  # accepts (backlog) but never answers: a read timeout
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = OptimoveClient(f"http://127.0.0.1:{listener.getsockname()[1]}/current", Secret("k" * 20), timeout=0.2)
    with pytest.raises(TemporaryError, match="timed out"):
        client.get("integrations", fn)
    client.close()
    listener.close()
    assert moves.delta() == [1, 1]


class ScriptedLimiter:
    def __init__(self, *waits: float):
        self.waits = list(waits)

    def try_acquire(self, priority: bool = False) -> float:
        return self.waits.pop(0)


def test_limiter_slots_and_waits(optimove):
    moves = Moves(("relay_limiter_requests_total", {"outcome": "slot"}),
                  ("relay_limiter_requests_total", {"outcome": "wait"}),
                  ("relay_limiter_wait_seconds_count", {}), ("relay_limiter_wait_seconds_sum", {}),
                  ("relay_limiter_wait_seconds_bucket", {"le": "2.5"}))
    client = OptimoveClient(optimove.url, Secret("k" * 20), limiter=ScriptedLimiter(0.0, 1.5, 0.25))
    client.get("customers", "GetX")
    with pytest.raises(RateLimited):
        client.get("customers", "GetX")
    with pytest.raises(RateLimited):
        client.post("integrations", "UpdateCustomerPromotionStatus", {}, priority=True)
    client.close()
    assert moves.delta() == [1, 2, 2, 1.75, 2]


# -- call sites: the bonus, revoke and send adapters -----------------------------------------------

@pytest.fixture
def peer():
    server = StubServer("/peer")
    yield server
    server.close()


def test_adapter_call_latency_by_adapter_and_outcome(peer):
    def reply(req):
        body = json.loads(req["body"])
        if "grants" in body:
            return 200, {}, json.dumps({"results": [{"idempotency_key": i["idempotency_key"], "status": "granted"}
                                                    for i in body["grants"]]}).encode()
        if "revokes" in body:
            return 503, {}, b"busy"
        return (409 if req["headers"].get("idempotency-key") == "k-1" else 400), {}, b"{}"

    peer.reply = reply
    moves = Moves(("relay_adapter_call_seconds_count", {"adapter": "bonus", "outcome": "2xx"}),
                  ("relay_adapter_call_seconds_count", {"adapter": "revoke", "outcome": "5xx"}),
                  ("relay_adapter_call_seconds_count", {"adapter": "send", "outcome": "4xx"}))
    bonus = HttpBonusAdapter(peer.url, "batch", batch_size=2)
    results = bonus.grant([GrantItem(f"g-{i}", 7, 504, f"c{i}", "WB23", "scheduled_bonus") for i in range(3)])
    assert [r.status for r in results] == ["granted"] * 3  # two calls: 2 + 1 items
    revoke = HttpRevokeAdapter(peer.url, "batch")
    assert revoke.deliver([RevokeItem("r-1", 7, "c1", "WB23", "ref")])[0].status == "retry"
    send = HttpSendAdapter(peer.url, "single")
    outcomes = send.send([SendItem(f"k-{i}", 7, 610, 14, f"c{i}", {}, [], None, "realtime") for i in (1, 2)])
    assert [r.status for r in outcomes] == ["sent", "rejected"]
    for adapter in (bonus, revoke, send):
        adapter.close()
    assert moves.delta() == [2, 1, 2]


def test_adapter_connection_errors_and_timeouts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    moves = Moves(("relay_adapter_call_seconds_count", {"adapter": "send", "outcome": "connection_error"}),
                  ("relay_adapter_call_seconds_count", {"adapter": "send", "outcome": "timeout"}))
    for url, timeout in ((f"http://127.0.0.1:{port}/sends", 1.0),
                         (f"http://127.0.0.1:{listener.getsockname()[1]}/sends", 0.2)):
        adapter = HttpSendAdapter(url, "batch", timeout=timeout)
        assert adapter.send([SendItem("k", 7, 610, 14, "c", {}, [], None, "realtime")])[0].status == "retry"
        adapter.close()
    listener.close()
    assert moves.delta() == [1, 1]


# -- scrape-time collectors ------------------------------------------------------------------------

def test_queue_depths_add_every_priority_list_and_the_unacked_hash():
    client = fakeredis.FakeRedis()
    client.rpush("grants", *range(3))
    client.rpush(f"grants{PRIORITY_SEPARATOR}6", "x")
    client.rpush("realtime", "y")
    client.hset("unacked", mapping={"a": "1", "b": "2"})
    assert queue_keys("grants")[0] == "grants" and len(queue_keys("grants")) == 4
    depths, unacked = queue_depths(client)
    assert depths == {"realtime": 1, "notifications": 0, "campaigns": 0, "grants": 4}
    assert unacked == 2


class DownEngine:
    def connect(self):
        raise sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))


def scrape(collector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_store_collector_reports_the_broker_and_which_source_is_down():
    client = fakeredis.FakeRedis()
    client.rpush("campaigns", "a", "b")
    text = scrape(StoreCollector(DownEngine(), client))
    assert 'relay_queue_messages{queue="campaigns"} 2.0' in text
    assert 'relay_queue_messages{queue="realtime"} 0.0' in text
    assert "relay_queue_unacked_messages 0.0" in text
    assert 'relay_metrics_source_up{source="postgres"} 0.0' in text
    assert 'relay_metrics_source_up{source="broker"} 1.0' in text
    assert "relay_notifications{" not in text


def test_store_collector_without_a_redis_broker_skips_queue_depth():
    assert broker_client("amqp://guest@rabbit//") is None and broker_client(None) is None
    assert broker_client("redis://127.0.0.1:1/0") is broker_client("redis://127.0.0.1:1/0")  # one per URL
    text = scrape(StoreCollector(DownEngine(), None))
    assert "relay_queue_messages" not in text and 'source="broker"' not in text


def test_registering_the_collector_runs_no_query():
    class Counting(DownEngine):
        calls = 0

        def connect(self):
            Counting.calls += 1
            return super().connect()

    CollectorRegistry().register(StoreCollector(Counting(), None))
    assert Counting.calls == 0


# -- a worker's own port (multiprocess mode, in a child interpreter) -------------------------------

WORKER_SCRIPT = textwrap.dedent("""
    import os, sys, time, urllib.request
    import cli.main  # as in `relay worker`: the CLI has imported the code that counts before the port is chosen
    from workers import metrics as worker_metrics
    url = worker_metrics.serve(int(sys.argv[1]), "127.0.0.1")
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    from shared import metrics
    metrics.observe_optimove_call("GetCustomerExecutionDetailsByCampaign", 200, 0.05)
    children = []
    for n in range(2):  # pool children: forked after the metrics exist, as Celery's prefork pool does
        pid = os.fork()
        if pid == 0:
            worker_metrics._child_started()
            metrics.observe_optimove_call("GetCustomerExecutionDetailsByCampaign", 200, 0.05)
            metrics.ledger_settled("grants", "scheduled_bonus", done=10 + n)
            worker_metrics._child_exiting(pid=os.getpid())
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    print(url)
    print(path)
    print(body)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker_script(port: int, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", WORKER_SCRIPT, str(port)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_worker_port_adds_up_every_process_of_the_worker(tmp_path):
    port = free_port()
    # an inherited PROMETHEUS_MULTIPROC_DIR (say, the web's) is not used: the worker takes a fresh one of its own
    done = run_worker_script(port, {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    url, path, body = done.stdout.split("\n", 2)
    assert url == f"http://127.0.0.1:{port}/metrics"
    assert path != str(tmp_path) and list(tmp_path.iterdir()) == []
    assert ('relay_optimove_calls_total{function="GetCustomerExecutionDetailsByCampaign",status="200"} 3.0'
            in body)
    assert 'relay_grants_total{flow="scheduled_bonus",outcome="granted"} 21.0' in body
    assert not os.path.exists(path), "the worker's metrics directory is removed when it exits"


def test_worker_port_taken_fails_before_anything_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        done = run_worker_script(taken.getsockname()[1])
    assert done.returncode != 0 and "Address already in use" in done.stderr


def test_worker_port_refuses_metrics_built_before_it():
    script = ("from shared import metrics; metrics.define()\n"
              "from workers import metrics as worker_metrics\n"
              f"worker_metrics.serve({free_port()})")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "built before the worker's metrics directory" in done.stderr


def test_worker_without_a_port_serves_nothing(monkeypatch):
    from workers import metrics as worker_metrics

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent")
    assert worker_metrics.serve(0) is None and worker_metrics.serve(None) is None
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_relay_worker_exits_2_naming_the_port_when_it_is_taken(monkeypatch):
    from click.testing import CliRunner

    from cli.main import main

    monkeypatch.setenv("DATABASE_URL", "postgresql://u@127.0.0.1:1/db")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["worker", "--metrics-port", str(port)])
    assert result.exit_code == 2
    assert f"worker metrics port 127.0.0.1:{port}" in result.output and "RELAY_WORKER_METRICS_PORT" in result.output


# -- relay up: a port per worker process -----------------------------------------------------------

def test_relay_up_gives_each_worker_its_own_port(tmp_path):
    from cli.supervisor import WORKER_METRICS_PORT, Supervisor
    from shared.settings import Settings

    sup = Supervisor(Settings.from_env({}), tmp_path, 8000, 5555, 2, False)
    names = ["worker", "realtime", "realtime2", "realtime3", "realtime4"]
    args = [sup._metrics_port(name) for name in names]
    ports = [int(a[1]) for a in args]
    assert all(a[0] == "--metrics-port" for a in args)
    assert len(set(ports)) == 5 and ports == sorted(ports) and ports[0] >= WORKER_METRICS_PORT
    assert sup.worker_metrics == dict(zip(names, ports))
    first = free_port()
    sup = Supervisor(Settings.from_env({"RELAY_WORKER_METRICS_PORT": str(first)}), tmp_path, 8000, 5555, 2, False)
    assert int(sup._metrics_port("worker")[1]) == first
    with socket.socket() as taken:  # a taken port is skipped for the next one
        taken.bind(("127.0.0.1", first))
        taken.listen(1)
        sup = Supervisor(Settings.from_env({"RELAY_WORKER_METRICS_PORT": str(first)}), tmp_path, 8000, 5555, 2,
                         False)
        assert int(sup._metrics_port("worker")[1]) > first
    sup = Supervisor(Settings.from_env({"RELAY_WORKER_METRICS_PORT": "0"}), tmp_path, 8000, 5555, 2, False)
    assert sup._metrics_port("worker") == [] and sup.worker_metrics == {}


def test_worker_metrics_settings():
    from shared.settings import Settings, SettingsError

    s = Settings.from_env({})
    assert s.worker_metrics_port is None and s.worker_metrics_bind == "127.0.0.1"
    s = Settings.from_env({"RELAY_WORKER_METRICS_PORT": "9400", "RELAY_WORKER_METRICS_BIND": "0.0.0.0"})
    assert (s.worker_metrics_port, s.worker_metrics_bind) == (9400, "0.0.0.0")
    assert Settings.from_env(s.to_env()) == s
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"RELAY_WORKER_METRICS_PORT": "65536", "RELAY_WORKER_METRICS_BIND": "a b"})
    assert "RELAY_WORKER_METRICS_PORT: expected an integer between 0 and 65535" in str(info.value)
    assert "RELAY_WORKER_METRICS_BIND: expected an address" in str(info.value)
