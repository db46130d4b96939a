"""A worker's own metrics port (`RELAY_WORKER_METRICS_PORT`, or `relay worker --metrics-port`).

What happens in a worker (Optimove calls, limiter waits, adapter latency, ledger outcomes, run
durations: `shared/metrics.py`) is counted in that worker, so each `relay worker` serves it on
its own port. With the prefork pool the work is done in the pool children, so the metrics use
prometheus-client's multiprocess mode: every process of the worker (the main one and each pool
child, including children that replaced dead ones) writes its values to files in a private
directory, and the main process's HTTP server adds them up on each scrape. The solo and threads
pools run tasks in the main process; the same files serve them.

`serve` runs in `relay worker` before the Celery app is built and before anything is counted
(`shared.metrics.define()` builds the metrics on first use, in the mode chosen here):

1. a fresh, empty directory for this worker (`relay-worker-metrics-*` in the temp folder), set
   as `PROMETHEUS_MULTIPROC_DIR` so this process and its pool children (forked later) write there;
2. the HTTP server on `bind:port`, in a daemon thread of the main process (a port already taken
   fails here, before the worker starts);
3. Celery signals: a pool child closes its inherited copy of the listening socket
   (`worker_process_init`) and is marked dead when it exits (`worker_process_shutdown`: its live
   gauges go; its counters stay in the sums); the directory is removed when the worker exits.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile

from celery import signals

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger(__name__)

_server = None
_path: str | None = None


def serve(port: int | None, bind: str = "127.0.0.1") -> str | None:
    """Serve this worker's metrics on `bind:port`; return the URL (None, and nothing served, when `port` is
    0 or None). Raises `OSError` when the port cannot be bound."""
    global _server, _path
    if not port:
        # no port: plain in-process metrics, whatever PROMETHEUS_MULTIPROC_DIR the environment carries
        os.environ.pop(MULTIPROC_ENV, None)
        _use_current_mode()
        return None
    path = tempfile.mkdtemp(prefix="relay-worker-metrics-")
    try:
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        server, _thread = start_http_server(port, addr=bind, registry=registry)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    os.environ[MULTIPROC_ENV] = path
    _use_current_mode()
    from shared import metrics

    if metrics.is_defined():  # built in plain mode: the pool children's counts would never reach the port
        server.shutdown()
        shutil.rmtree(path, ignore_errors=True)
        raise RuntimeError("the relay's metrics were built before the worker's metrics directory was set")
    metrics.define()  # the families show from the first scrape, before any work
    _server, _path = server, path
    main_pid = os.getpid()
    atexit.register(lambda: os.getpid() == main_pid and shutil.rmtree(path, ignore_errors=True))
    signals.worker_process_init.connect(_child_started, weak=False)
    signals.worker_process_shutdown.connect(_child_exiting, weak=False)
    host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
    url = f"http://{host}:{port}/metrics"
    # said once Celery has set up logging (RELAY_LOG_FORMAT), not printed past it
    signals.worker_ready.connect(lambda **_: log.info("worker metrics on %s (bound to %s)", url, bind), weak=False)
    return url


def _use_current_mode() -> None:
    """Make metric values created from now on follow `PROMETHEUS_MULTIPROC_DIR` as it is now (prometheus-client
    reads it when `prometheus_client.values` is first imported, which may have happened already)."""
    from prometheus_client import values

    values.ValueClass = values.get_value_class()


def _child_started(**_kwargs) -> None:
    """In a pool child: close the inherited copy of the main process's listening socket."""
    if _server is not None:
        try:
            _server.socket.close()
        except OSError:
            pass


def _child_exiting(pid: int | None = None, **_kwargs) -> None:
    """In a pool child that exits: drop its live gauges from the sums (its counters stay)."""
    if _path is None:
        return
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid or os.getpid(), _path)
    except OSError:
        pass
