"""`relay up` as a newcomer runs it: no services configured, embedded stores, the simulator attached."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg2
import pytest
import requests

from cli.embedded import free_port
from tests.conftest import ROOT, poll

# `relay up` runs one at a time (under xdist all of them on one worker): each starts a whole stack
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("relay_up")]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "OPTIMOVE_", "BONUS_", "DATABASE_URL", "REDIS_URL", "FLOWER_"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


def start_up(data_dir, port, log):
    return subprocess.Popen([sys.executable, "-m", "cli.main", "up", "--port", str(port), "--data-dir",
                             str(data_dir), "--flower-port", str(free_port())], cwd=ROOT, env=clean_env(),
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def ready(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def flower_answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code in (200, 401)
    except requests.RequestException:
        return False


def child_role(cmdline: list[str]) -> str:
    """Which `relay up` child a process is (pool children count as their worker)."""
    text = " ".join(cmdline)
    for name, marker in (("simulator", "simulator serve"), ("realtime", "--queues realtime"),
                         ("worker", " worker "), ("beat", " beat "), ("flower", " flower "), ("web", "gunicorn"),
                         ("web", " web ")):
        if marker in text:
            return name
    return text[:60]


def tree(pid: int) -> list[psutil.Process]:
    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


def niced_backends(database_url: str) -> set[int]:
    """The CPU niceness of each embedded Postgres backend serving a niced relay process."""
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name ~ '^relay-[0-9]+-nice10$'")
        pids = [pid for (pid,) in cur.fetchall()]
    conn.close()
    return {psutil.Process(pid).nice() for pid in pids if psutil.pid_exists(pid)}


def stop(proc, log_path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("relay up did not stop within 60 s:\n" + log_path.read_text()[-4000:])


def test_up_ready_simulate_stop_restart(tmp_path):
    data_dir, port = tmp_path / "data", free_port()
    log_path = tmp_path / "up.log"
    log = open(log_path, "ab")
    started = time.monotonic()
    proc = start_up(data_dir, port, log)
    try:
        poll(lambda: ready(port) and (data_dir / "up.json").exists(), 30, 0.1, "relay up ready within 30 s")
        ready_after = time.monotonic() - started
        print(f"relay up ready after {ready_after:.1f}s")
        info = json.loads((data_dir / "up.json").read_text())
        output = log_path.read_text()
        assert "relay simulate campaign" in output and info["listener_url"] in output
        assert "relay simulate realtime --role send" in output
        assert {"600": "bonus", "610": "send"}.items() <= info["channels"].items()
        admin = (info["admin_user"], info["admin_password"])
        poll(lambda: flower_answers(info["flower_url"]), 30, 0.2, "Flower answering")
        assert requests.get(info["flower_url"], timeout=5).status_code == 401  # Flower is never open
        assert requests.get(info["flower_url"], auth=admin, timeout=5).status_code == 200
        children = tree(proc.pid)
        assert len(children) > 6  # web + workers, worker + pool, beat, flower, simulator, postgres, redis
        niceness = {}  # the listener keeps its CPU priority while a campaign keeps the workers busy
        for p in children:
            try:
                niceness.setdefault(child_role(p.cmdline()), set()).add(p.nice())
            except psutil.Error:
                pass
        assert niceness["web"] == {0} and niceness["realtime"] == {0}, niceness
        assert niceness["worker"] == niceness["beat"] == niceness["simulator"] == {10}, niceness
        worker = next(p for p in children if child_role(p.cmdline()) == "worker")
        autogroup = Path(f"/proc/{worker.pid}/autogroup")
        if autogroup.exists():  # the session's scheduling group is niced too, or the nice is moot
            assert autogroup.read_text().split()[-1] == "10", autogroup.read_text()

        sim = subprocess.run([sys.executable, "-m", "cli.main", "simulate", "campaign", "--data-dir",
                              str(data_dir), "--customers", "1000", "--json", "--timeout", "60"],
                             cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=90)
        assert sim.returncode == 0, sim.stdout + sim.stderr + log_path.read_text()[-4000:]
        summary = json.loads(sim.stdout)
        assert summary["ok"] and summary["duplicate_grants"] == 0
        assert summary["granted_at_bonus_system"] == summary["expected_triples"] > 0
        assert summary["seconds"] < 60
        # the embedded Postgres backends serving the niced campaign worker run at its niceness too
        poll(lambda: niced_backends(info["database_url"]) == {10}, 15, 0.2, "the worker's Postgres backends niced")
        # each worker process serves its own metrics (relay up gives each a port): the campaign's pages are there
        assert set(info["worker_metrics"]) == {"worker", "realtime", "realtime2", "realtime3", "realtime4"}
        scraped = requests.get(info["worker_metrics"]["worker"], timeout=5).text
        assert 'relay_optimove_calls_total{function="GetCustomerExecutionDetailsByCampaign",status="200"}' in scraped

        sends = subprocess.run([sys.executable, "-m", "cli.main", "simulate", "campaign", "--role", "send",
                                "--data-dir", str(data_dir), "--customers", "600", "--spread", "6", "--json",
                                "--timeout", "60"], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                               timeout=120)  # pre-scheduled sends (flow 1) out of the box
        assert sends.returncode == 0, sends.stdout + sends.stderr + log_path.read_text()[-4000:]
        send_summary = json.loads(sends.stdout)
        assert send_summary["ok"] and send_summary["sent"] == send_summary["expected_sends"] == 600, send_summary
        assert send_summary["early"] == 0 and send_summary["duplicates"] == 0 and send_summary["wrong_attributes"] == 0
        assert info["channel_attributes"] == {"610": ["Email", "Country"]}

        cond = subprocess.run([sys.executable, "-m", "cli.main", "simulate", "conditional", "--data-dir",
                               str(data_dir), "--customers", "500", "--deadline-in", "30", "--reject-every", "10",
                               "--json"], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
        assert cond.returncode == 0, cond.stdout + cond.stderr + log_path.read_text()[-4000:]
        conditional = json.loads(cond.stdout)  # flow 4 out of the box
        assert conditional["ok"] and conditional["approved_before_deadline"] == conditional["expected_approved"] > 0
        assert conditional["approved_after_deadline"] == 0 and conditional["grants_after_deadline"] == 0

        for role in ("send", "bonus"):  # real-time triggers work out of the box too
            rt = subprocess.run([sys.executable, "-m", "cli.main", "simulate", "realtime", "--data-dir",
                                 str(data_dir), "--role", role, "--rate", "10", "--duration", "2", "--json"],
                                cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
            assert rt.returncode == 0, rt.stdout + rt.stderr + log_path.read_text()[-4000:]
            realtime = json.loads(rt.stdout)
            assert realtime["ok"] and realtime["lost"] == 0 and realtime["duplicate_effects"] == 0, realtime
            assert realtime["effects_seen"] == realtime["expected_effects"] > 0

        pg_pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        everything = {p.pid for p in children} | {pg_pid} | {c.pid for c in psutil.Process(pg_pid).children()}
    finally:
        stop(proc, log_path)
    alive = [p for p in everything if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[psutil.Process(p).cmdline() for p in alive]}"
    assert "stopped" in log_path.read_text().splitlines()[-1]

    proc = start_up(data_dir, port, log)
    try:
        poll(lambda: ready(port), 30, 0.1, "second relay up ready")
        auth = (info["admin_user"], info["admin_password"])
        status = requests.get(f"http://127.0.0.1:{port}/api/campaigns/{summary['campaign_id']}", auth=auth,
                              timeout=5).json()
        assert status["status"] == "done"
        assert status["totals"]["granted"] == summary["expected_triples"]
        assert requests.get(f"http://127.0.0.1:{port}/api/notifications/1", auth=auth, timeout=5).json()[
            "status"] == "done"
    finally:
        stop(proc, log_path)
