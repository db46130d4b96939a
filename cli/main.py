"""The `relay` command: run the relay and its processes, migrate, inspect and simulate."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import click

from cli.common import celery_app as _celery, load_settings
from shared.dispatch import QUEUES

DEFAULT_DATA_DIR = ".relay"


@click.group()
def main() -> None:
    """Optimove Relay: receives Optimove notifications and grants campaign promotions exactly once."""


@main.command()
@click.option("--port", default=8000, show_default=True, help="listener/web port on 127.0.0.1")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, type=click.Path(path_type=Path),
              help="folder for the embedded Postgres/Redis data and generated secrets")
@click.option("--flower-port", default=5555, show_default=True, help="Flower port (a free one if taken)")
@click.option("--workers", default=2, show_default=True, help="worker processes (Celery concurrency)")
@click.option("--simulator/--no-simulator", default=None,
              help="attach the fake Optimove and bonus system (default: when OPTIMOVE_API_URL is unset)")
@click.option("--worker-nice", default=10, show_default=True, type=click.IntRange(0, 19),
              help="CPU niceness of the campaign worker, beat, Flower and the simulator (web and the "
                   "real-time workers keep 0, so the listener answers while a campaign runs)")
def up(port: int, data_dir: Path, flower_port: int, workers: int, simulator: bool | None, worker_nice: int) -> None:
    """Run everything: stores (embedded unless DATABASE_URL/REDIS_URL), web, worker, beat, flower."""
    from cli.supervisor import Supervisor

    settings = load_settings()
    if settings.log_format is None:  # the children write to pipes: give them the format of this terminal
        from dataclasses import replace

        from shared.logs import resolve_format

        settings = replace(settings, log_format=resolve_format(None))
    sys.exit(Supervisor(settings, data_dir, port, flower_port, workers, simulator, worker_nice).run())


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply the Alembic migrations to DATABASE_URL."""
    from shared.db import upgrade

    settings = load_settings("database_url")
    upgrade(settings.database_url, revision)
    click.echo(f"database at revision {revision}")


def default_web_workers() -> int:
    """Two sync workers per CPU: a request spends part of its time waiting for Postgres' commit and
    Redis' answer, and a second worker per core uses that time (bench/receiver.py: 1,258-1,263
    req/s with 4 on 2 cores against 988 with 2, p99 at 200/s 2.7-3.4 ms against 4.1 ms; 5 was
    slower again)."""
    return 2 * (os.cpu_count() or 1)


@main.command()
@click.option("--port", type=int, default=lambda: int(os.environ.get("PORT", 8000)), show_default="$PORT or 8000")
@click.option("--bind", default="127.0.0.1", show_default=True, help="address to bind (0.0.0.0 in containers)")
@click.option("--workers", type=int, default=default_web_workers, show_default="two per CPU",
              help="gunicorn worker processes")
@click.option("--threads", default=1, show_default=True,
              help="threads per worker (1: sync workers, the fastest for this CPU-bound endpoint behind a proxy)")
def web(port: int, bind: str, workers: int, threads: int) -> None:
    """Serve the listener, status API, health and metrics with gunicorn.

    The access log shows the path without the query string: the listener token travels there.
    """
    load_settings("database_url", "redis_url")
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="relay-metrics-")
    argv = [sys.executable, "-m", "gunicorn", "--bind", f"{bind}:{port}", "--workers", str(workers),
            "--threads", str(threads), "--worker-class", "gthread" if threads > 1 else "sync",
            "--access-logfile", "-", "--access-logformat", '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms',
            "--graceful-timeout", "10", "--logger-class", "shared.logs.GunicornLogger", "web.app:create_app()"]
    os.execv(sys.executable, argv)


def _quiet(settings) -> list[str]:
    """Celery's `-q` when logging json: its start-up banner is printed, not logged."""
    from shared.logs import resolve_format

    return ["-q"] if resolve_format(settings.log_format) == "json" else []


@main.command()
@click.option("--queues", default=",".join(QUEUES), show_default=True,
              help="comma-separated queues to consume (default: every queue)")
@click.option("--concurrency", default=2, show_default=True, help="processes (prefork) or threads (solo: 1)")
@click.option("--pool", type=click.Choice(["prefork", "threads", "solo"]), default="prefork", show_default=True,
              help="prefork for the CPU-bound campaign queues; threads or solo (one task at a time in the "
                   "worker's own thread) for the latency-bound realtime queue")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              show_default="$RELAY_WORKER_METRICS_PORT, else none",
              help="serve this worker's Prometheus metrics (its pool children's included) on this port; 0: none")
@click.option("--hostname", "-n", default=None, show_default="relay-<pid>@<host>",
              help="the worker's Celery node name (one per machine or process; %h is the host name)")
def worker(queues: str, concurrency: int, pool: str, metrics_port: int | None, hostname: str | None) -> None:
    """Run a Celery worker on the given queues (each process or thread takes one message at a time)."""
    unknown = [q for q in queues.split(",") if q.strip() not in QUEUES]
    if unknown or not queues.strip():
        click.echo(f"relay: --queues: unknown queue(s) {', '.join(unknown) or '(none given)'}; "
                   f"expected some of {', '.join(QUEUES)}", err=True)
        sys.exit(2)
    settings = load_settings("database_url", "redis_url")
    port = settings.worker_metrics_port if metrics_port is None else metrics_port
    from workers import metrics as worker_metrics

    try:  # before the Celery app is built: every metric must see the multiprocess directory
        worker_metrics.serve(port, settings.worker_metrics_bind)  # logged once the worker is ready
    except OSError as exc:
        click.echo(f"relay: worker metrics port {settings.worker_metrics_bind}:{port} "
                   f"(--metrics-port / RELAY_WORKER_METRICS_PORT): cannot listen: {exc}", err=True)
        sys.exit(2)
    app, settings = _celery()
    if pool == "threads":
        from celery import concurrency as pools

        pools.ALIASES["custom"] = "workers.pool:WakingThreadPool"  # Celery's hook for an own pool
        pool = "custom"
    if pool == "solo":
        concurrency = 1
    app.worker_main([*_quiet(settings), "worker", "-Q", queues, "-c", str(concurrency), "-P", pool,
                     "-n", hostname or f"relay-{os.getpid()}@%h", "--loglevel", settings.log_level.upper(),
                     "--without-gossip", "--without-mingle"])


@main.command()
@click.option("--schedule-file", default=lambda: os.path.join(tempfile.gettempdir(), "relay-beat-schedule"),
              show_default="a file in the temp folder")
def beat(schedule_file: str) -> None:
    """Run Celery beat (the sweeper)."""
    app, settings = _celery()
    app.start([*_quiet(settings), "beat", "--schedule", schedule_file, "--loglevel", settings.log_level.upper()])


@main.command()
@click.option("--port", default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True)
def flower(port: int, address: str) -> None:
    """Run Flower (basic auth from FLOWER_BASIC_AUTH; bind to loopback unless it is set)."""
    app, settings = _celery()
    if address not in ("127.0.0.1", "localhost", "::1") and not settings.flower_basic_auth:
        click.echo("relay: FLOWER_BASIC_AUTH: required when Flower binds to a non-loopback address", err=True)
        sys.exit(2)
    argv = ["flower", f"--port={port}", f"--address={address}"]
    if settings.flower_basic_auth:
        argv.append(f"--basic-auth={settings.flower_basic_auth.get()}")
    app.start(argv)


@main.command()
def sweep() -> None:
    """Re-enqueue unfinished work once (beat does this periodically)."""
    from shared.broker import publish
    from shared.flows import sweeper

    app, _ = _celery()
    items = sweeper.sweep(app.relay_runtime)
    publish(app, items)
    click.echo(f"re-enqueued {len(items)} task(s)")


@main.group()
def campaigns() -> None:
    """Inspect campaigns."""


@campaigns.command("show")
@click.argument("campaign_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def campaigns_show(campaign_id: int, as_json: bool) -> None:
    """Runs of a campaign per channel: cursor, counts, status, timings; and its ledgers."""
    from shared.db import unit_of_work
    from shared.runtime import Runtime
    from shared.views import campaign_status

    rt = Runtime(load_settings("database_url"))
    with unit_of_work(rt.engine) as conn:
        status = campaign_status(conn, campaign_id)
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    click.echo(f"campaign {campaign_id}: {status['status']}")
    header = f"{'run':>6} {'flow':<16} {'channel':>8} {'status':<9} {'cursor':>8} {'fetched':>8} {'claimed':>8} " \
             f"{'dup':>8} {'granted':>8} {'sent':>8} {'waiting':>8} {'rejected':>8} {'failed':>7} {'secs':>7}"
    click.echo(header)
    for r in status["runs"]:
        click.echo(f"{r['run_id']:>6} {r['flow']:<16} {str(r['channel_id']):>8} {r['status']:<9} {r['cursor']:>8} "
                   f"{r['fetched']:>8} {r['claimed']:>8} {r['duplicates_skipped']:>8} {r['granted']:>8} {r['sent']:>8} "
                   f"{r['waiting']:>8} {r['rejected']:>8} {r['failed']:>7} {r['seconds']:>7.1f}")
        if r["last_error"]:
            click.echo(f"{'':>6} last error: {r['last_error']}")
        if r["metrics_error"]:
            click.echo(f"{'':>6} metrics report failed: {r['metrics_error']}")
    t = status["totals"]
    click.echo(f"totals: fetched {t['fetched']}, claimed {t['claimed']}, skipped as already in the ledger "
               f"{t['duplicates_skipped']}, granted {t['granted']}, sent {t['sent']}, waiting for their time "
               f"{t['waiting']}, rejected {t['rejected']}, failed {t['failed']}")
    for name, counts in status["ledgers"].items():
        if counts:
            click.echo(f"{name} ledger: " + ", ".join(f"{s} {n}" for s, n in sorted(counts.items())))


@campaigns.command("redrive")
@click.argument("campaign_id", type=int)
def campaigns_redrive(campaign_id: int) -> None:
    """Resume a campaign's failed runs and deliver its failed grants and sends again (same idempotency keys)."""
    from shared.broker import publish
    from shared.flows.sweeper import redrive_campaign

    app, _ = _celery()
    runs, rows, items = redrive_campaign(app.relay_runtime, campaign_id)
    publish(app, items)
    click.echo(f"campaign {campaign_id}: resuming {runs} failed run(s), re-sending {rows['grants']} failed "
               f"grant(s), {rows['sends']} failed send(s) and {rows['revokes']} failed revoke(s)")


from cli.simulate import simulate  # noqa: E402

main.add_command(simulate)

from cli.optimove_setup import templates  # noqa: E402

main.add_command(templates)

from cli.promotions import promotions  # noqa: E402

main.add_command(promotions)

from cli.inspection import grants, notifications, sends  # noqa: E402

main.add_command(grants)
main.add_command(sends)
main.add_command(notifications)

from cli.listeners import listeners  # noqa: E402

main.add_command(listeners)

if __name__ == "__main__":
    main()
