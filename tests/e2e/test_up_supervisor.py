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

import psutil
import pytest

from cli.embedded import free_port
from tests.conftest import ROOT, poll
from tests.e2e.test_relay_up import clean_env, ready, tree

pytestmark = pytest.mark.e2e


def start(data_dir, port, **popen):
    argv = [sys.executable, "-m", "cli.main", "up", "--port", str(port), "--data-dir", str(data_dir),
            "--flower-port", str(free_port())]
    return subprocess.Popen(argv, cwd=ROOT, env=clean_env(), stdin=subprocess.DEVNULL, **popen)


def everything(proc, data_dir) -> dict[int, str]:
    """Every process `relay up` runs: its tree, the reaper, the embedded Postgres and Redis."""
    procs = {p.pid: " ".join(p.cmdline())[:120] for p in tree(proc.pid)[1:]}
    pg_pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    for p in [psutil.Process(pg_pid), *psutil.Process(pg_pid).children()]:
        procs[p.pid] = "postgres " + p.name()
    redis_pid = int((data_dir / "redis" / "redis.pid").read_text())
    procs[redis_pid] = "redis"
    for p in psutil.process_iter(["cmdline"]):
        if "cli.reaper" in " ".join(p.info["cmdline"] or []):
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


def wait_ready(port, data_dir, proc):
    poll(lambda: proc.poll() is not None or (ready(port) and (data_dir / "up.json").exists()), 60, 0.1,
         "relay up ready")
    assert proc.poll() is None, f"relay up exited with {proc.returncode}"


def test_sigkilled_up_leaves_nothing_running_and_the_next_start_finds_its_data(tmp_path):
    data_dir, port = tmp_path / "data", free_port()
    proc = start(data_dir, port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, data_dir, proc)
        procs = everything(proc, data_dir)
        assert sum(1 for name in procs.values() if "cli.main worker" in name) >= 5, procs
        token = json.loads((data_dir / "up.json").read_text())["listener_url"]
    finally:
        proc.kill()  # SIGKILL: no handler runs in relay up
        proc.wait()
    # the reaper stops every group (SIGTERM, SIGKILL after 10 s) and Postgres
    poll(lambda: not left(procs), 40, 0.2, "every process of the SIGKILLed relay up gone")

    again = start(data_dir, port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, data_dir, again)
        assert json.loads((data_dir / "up.json").read_text())["listener_url"] == token  # same folder, same secrets
        procs = everything(again, data_dir)
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
