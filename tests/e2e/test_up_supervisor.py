"""`relay up` leaves nothing behind however it ends, keeps its data folder to itself, and names a busy port.

Found when tried as a new user would: `make run | tee relay.log`, then Ctrl-C, left Postgres, Redis,
the simulator, web, worker, beat and Flower running (each in its own session); a SIGKILLed
`relay up` did the same; a second `relay up` on the same folder then started a second Redis on the
same AOF folder and could not bind its port.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from cli.embedded import free_port
from tests.conftest import ADMIN_PASSWORD, ROOT, TOKEN, poll
from tests.e2e.test_relay_up import clean_env, ready, tree
from tests.faults.support import API_KEY, create_campaign, fire, ledger, measured_bonus, record_figures
from tests.harness import campaign_status

# `relay up` runs one at a time (under xdist all of them on one worker): each starts a whole stack
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("relay_up")]


def start(data_dir, port, env=None, **popen):
    argv = [sys.executable, "-m", "cli.main", "up", "--port", str(port), "--data-dir", str(data_dir),
            "--flower-port", str(free_port())]
    return subprocess.Popen(argv, cwd=ROOT, env={**clean_env(), **(env or {})}, stdin=subprocess.DEVNULL, **popen)


def everything(proc, data_dir) -> dict[int, str]:
    """Every process `relay up` runs: its tree, the reaper, the embedded Postgres and Redis."""
    procs = {}
    for p in tree(proc.pid)[1:]:
        try:
            procs[p.pid] = " ".join(p.cmdline())[:120]
        except psutil.Error:  # a child that just exited (a zombie until reaped): nothing left to stop
            pass
    pg_pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    postmaster = psutil.Process(pg_pid)
    for p in [postmaster, *postmaster.children()]:
        try:
            procs[p.pid] = "postgres " + p.name()
        except psutil.Error:  # a backend that ended in between: nothing left to stop
            pass
    redis_pid = int((data_dir / "redis" / "redis.pid").read_text())
    procs[redis_pid] = "redis"
    for p in psutil.process_iter(["cmdline", "ppid"]):  # this relay up's reaper (not another test's)
        if "cli.reaper" in " ".join(p.info["cmdline"] or []) and p.info["ppid"] == proc.pid:
            procs[p.pid] = "reaper"
    return procs


def left(procs: dict[int, str]) -> dict[int, str]:
    out = {}
    for pid, name in procs.items():
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out[pid] = name
        except psutil.Error:
            pass
    return out


def wait_ready(port, data_dir, proc, log=None):
    poll(lambda: proc.poll() is not None or (ready(port) and (data_dir / "up.json").exists()), 60, 0.1,
         "relay up ready")
    output = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    assert proc.poll() is None, f"relay up exited with {proc.returncode}\n{output}"


def test_sigkilled_up_leaves_nothing_running_and_the_next_start_finds_its_data(tmp_path, make_simulator,
                                                                               record_property):
    """`relay up` SIGKILLed mid-campaign, then started again on the same folder: nothing of the first left
    running in between, and the campaign acknowledged before the kill finishes after the restart with every
    grant made exactly once. The fake Optimove and bonus system run in the test (OPTIMOVE_API_URL and
    BONUS_URL set, so `relay up` attaches no simulator of its own) and outlive both `relay up`s."""
    sim = make_simulator(rate_limit=(1000, 10.0), latency_ms=150)
    env = {"OPTIMOVE_API_URL": sim.optimove_url, "OPTIMOVE_API_KEY": API_KEY, "OPTIMOVE_RATE_LIMIT": "1000/10s",
           "OPTIMOVE_PAGE_SIZE": "200", "BONUS_URL": sim.bonus_url, "BONUS_MODE": "batch",
           "BONUS_BATCH_SIZE": "200", "RELAY_LISTENER_TOKENS": TOKEN, "RELAY_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "RELAY_SWEEP_AFTER": "3", "RELAY_SWEEP_INTERVAL": "1"}
    campaign = create_campaign(sim, 858585, customers_per_channel=3000)
    expected = len(campaign.triples)
    data_dir, port = tmp_path / "data", free_port()
    log = tmp_path / "up-1.log"
    with open(log, "wb") as out:
        proc = start(data_dir, port, env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, data_dir, proc, log)
        def all_workers():  # they may still be starting when web answers (a loaded machine)
            found = everything(proc, data_dir)
            return found if sum(1 for name in found.values() if "cli.main worker" in name) >= 5 else None

        procs = poll(all_workers, 60, 0.2, "the campaign worker and the four real-time workers running")
        info = json.loads((data_dir / "up.json").read_text())
        assert "simulator" not in info  # the peers are the test's
        fire(info["url"], campaign)
        poll(lambda: ledger(sim)["applied"] >= expected // 5, 60, 0.1, "a fifth of the grants made")
    finally:
        proc.kill()  # SIGKILL: no handler runs in relay up
        proc.wait()
    granted_at_kill = ledger(sim)["applied"]
    assert granted_at_kill < expected, "the kill landed after the campaign ended; make it longer"
    # the reaper stops every group (SIGTERM, SIGKILL after 10 s) and Postgres
    poll(lambda: not left(procs), 40, 0.2, "every process of the SIGKILLed relay up gone")

    log = tmp_path / "up-2.log"
    with open(log, "wb") as out:
        again = start(data_dir, port, env, stdout=out, stderr=subprocess.STDOUT)
    try:
        restarted = time.monotonic()
        wait_ready(port, data_dir, again, log)
        assert json.loads((data_dir / "up.json").read_text())["listener_url"] == info["listener_url"]
        procs = everything(again, data_dir)
        status = poll(lambda: (s := campaign_status(info["url"], campaign.id)).get("status") == "done" and s, 120,
                      0.2, f"campaign {campaign.id} done after the restart")
        recovered = time.monotonic() - restarted
        lost, duplicates = measured_bonus(sim, campaign)
        record_figures(record_property, lost, duplicates, recovered)
        summary = ledger(sim)
        assert (lost, duplicates) == (0, 0), summary
        assert summary["applied"] == expected and summary["rejected"] == 0
        assert status["totals"]["granted"] == expected, status
        print(f"\nrelay up SIGKILLed at {granted_at_kill} of {expected} granted; nothing left running; the second "
              f"relay up finished the campaign {recovered:.1f}s after its start; bonus calls {summary['calls']}, "
              f"items {summary['items_received']}, lost 0, duplicates 0")
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0
    assert not left(procs), left(procs)


def test_a_second_up_on_the_same_folder_exits_2_and_a_busy_port_is_named_before_anything_starts(tmp_path):
    data_dir, port = tmp_path / "data", free_port()
    first = start(data_dir, port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, data_dir, first)
        redis_pid = (data_dir / "redis" / "redis.pid").read_text()
        second = subprocess.run([sys.executable, "-m", "cli.main", "up", "--port", str(free_port()),
                                 "--data-dir", str(data_dir)], cwd=ROOT, env=clean_env(), capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"the data folder {data_dir} is in use by another `relay up` (pid {first.pid})" in second.stdout
        assert (data_dir / "redis" / "redis.pid").read_text() == redis_pid  # no second Redis on the AOF folder

        other = tmp_path / "other"
        busy = subprocess.run([sys.executable, "-m", "cli.main", "up", "--port", str(port), "--data-dir",
                               str(other)], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
        assert busy.returncode == 2, busy.stdout + busy.stderr
        assert f"port {port} (the web listener, --port) is in use" in busy.stdout
        assert not (other / "postgres").exists() and not (other / "redis").exists()  # nothing was started
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)


def test_ctrl_c_with_the_output_pipe_closed_still_stops_everything(tmp_path):
    """`relay up | tee log`, then Ctrl-C: the pipe closes first, and the stop must still finish."""
    data_dir, port = tmp_path / "data", free_port()
    read_end, write_end = os.pipe()
    reader_gone = threading.Event()

    def reader():  # reads like `tee` until told to go, then closes its end as a dying reader does
        while not reader_gone.is_set():
            if not os.read(read_end, 65536):
                break
        os.close(read_end)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    proc = start(data_dir, port, stdout=write_end, stderr=write_end)
    os.close(write_end)
    try:
        wait_ready(port, data_dir, proc)
        procs = everything(proc, data_dir)
        reader_gone.set()
        thread.join(30)  # the relay keeps logging, so the reader wakes and closes at once
        assert not thread.is_alive()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    poll(lambda: not left(procs), 30, 0.2, "every process stopped")
